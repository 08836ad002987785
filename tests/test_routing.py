"""Routing rules (gateway/routing.py) and named scheduler instances (gateway/config.py): the rule
matching as pure functions, the start-up checks with the path of each mistake, and, in process,
a gateway with two local instances routing by cores and by explicit request (v1 and TES)."""
from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import config as configuration
from gateway import routing
from gateway.app import create_app
from gateway.config import Bounds, RouteRule
from gateway.plugins import create_schedulers
from gateway.routing import Request

from .conftest import final, wait_state

SCHEDULERS = {"small": {"type": "local", "poll_interval": 0.1, "options": {"cores": 1}},
              "big": {"type": "local", "poll_interval": 0.1, "options": {"cores": 2}}}


def rule(scheduler: str, **conditions: Any) -> RouteRule:
    """A rule as the config builds it: every condition not given is None."""
    fields: dict[str, Any] = {name: None for name in ("users", "groups", "images", *routing.NUMBERS)}
    fields["requested"] = conditions.pop("requested", False)
    for name, value in conditions.items():
        fields[name] = Bounds(*value) if name in routing.NUMBERS else tuple(value)
    return RouteRule(scheduler=scheduler, **fields)


def no_groups(user: str) -> frozenset[str]:
    return frozenset({"staff"}) if user == "carol" else frozenset()


RULES = [rule("hpc", cores=(2, None)), rule("gpu", gpus=(1, None)), rule("small", memory=(None, 1024)),
         rule("hpc", requested=True)]
INSTANCES = ["small", "hpc", "gpu"]


def chosen(request: Request, rules: list[RouteRule] = RULES) -> tuple[str, int | None]:
    choice = routing.choose(rules, INSTANCES, request, no_groups)
    return choice.scheduler, choice.rule


# ---- matching --------------------------------------------------------------------------------


def test_first_matching_rule_wins() -> None:
    assert chosen(Request("a", cores=4, gpus=2)) == ("hpc", 0)  # rule 2 would take it too
    assert chosen(Request("a", gpus=1)) == ("gpu", 1)
    assert chosen(Request("a", memory=512)) == ("small", 2)


def test_what_a_task_does_not_say() -> None:
    """No cores: 1; no GPUs: 0; no memory: within every max, below every min."""
    assert chosen(Request("a")) == ("small", 2)
    assert routing.outside("memory", Bounds(10, None), None) == routing.Mismatch(
        "$.memory", "needs at least 10 MiB; the task does not say")
    assert routing.outside("cores", Bounds(1, 1), None) is None
    assert routing.outside("gpus", Bounds(None, 0), None) is None


def test_bounds_are_inclusive() -> None:
    assert routing.outside("cores", Bounds(2, 4), 2) is None and routing.outside("cores", Bounds(2, 4), 4) is None
    assert routing.outside("cores", Bounds(2, 4), 5) == routing.Mismatch(
        "$.cores", "takes at most 4 cores; the task asks for 5")
    assert routing.outside("cputime", Bounds(60, None), 59).message == "needs at least 60 s; the task asks for 59"  # type: ignore[union-attr]


def test_users_groups_and_images() -> None:
    rules = [rule("hpc", users=["alice", "bob"]), rule("gpu", groups=["staff"]),
             rule("small", images=["docker.io/library/*", "busybox"])]
    assert chosen(Request("bob"), rules) == ("hpc", 0)
    assert chosen(Request("carol"), rules) == ("gpu", 1)
    assert chosen(Request("dave", images=("busybox",)), rules) == ("small", 2)
    assert chosen(Request("dave", images=("docker.io/library/debian:12", "busybox")), rules) == ("small", 2)
    with pytest.raises(routing.NoRoute) as refused:
        chosen(Request("dave", images=("busybox", "quay.io/x")), rules)
    assert refused.value.details == [
        {"path": "$.user", "message": "rule 1 (hpc): the user 'dave' is not one of alice, bob"},
        {"path": "$.user", "message": "rule 2 (gpu): the user 'dave' is in none of the groups staff"},
        {"path": "$.container.image",
         "message": "rule 3 (small): the image 'quay.io/x' matches none of docker.io/library/*, busybox"}]
    with pytest.raises(routing.NoRoute, match="the task names none"):
        chosen(Request("dave"), rules)


def test_groups_are_the_users_unix_groups() -> None:
    """Looked up for real: the primary group and the supplementary ones; none for a stranger."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    primary = grp.getgrgid(pwd.getpwuid(os.geteuid()).pw_gid).gr_name
    assert primary in routing.unix_groups(me)
    assert routing.unix_groups("no-such-user-here") == frozenset()
    assert routing.choose([rule("small", groups=[primary])], ["small"], Request(me)).scheduler == "small"


def test_an_explicit_request() -> None:
    """A task asking for an instance goes there or is refused; `requested` rules take only such tasks."""
    assert chosen(Request("a", requested="hpc")) == ("hpc", 3)  # rule 1 wants 2 cores; rule 4 lets anyone ask
    assert chosen(Request("a", cores=8, requested="hpc")) == ("hpc", 0)
    assert chosen(Request("a", memory=100, requested="small")) == ("small", 2)
    with pytest.raises(routing.NoRoute) as refused:
        chosen(Request("a", requested="gpu"))
    assert str(refused.value) == ("no routing rule lets this task ask for 'gpu': rule 2 (gpu): needs at least 1 "
                                  "GPUs; the task asks for 0 ($.gpus)")
    with pytest.raises(routing.NoRoute) as unknown:
        chosen(Request("a", requested="cloud"))
    assert unknown.value.details == [{"path": "$.scheduler",
                                      "message": "there is no scheduler 'cloud' here (configured: small, hpc, gpu)"}]
    with pytest.raises(routing.NoRoute, match="no rule sends tasks to 'gpu'"):
        chosen(Request("a", requested="gpu"), [rule("small")])


def test_a_task_no_rule_takes_is_refused_naming_each_rule() -> None:
    with pytest.raises(routing.NoRoute) as refused:
        chosen(Request("a", memory=4096))
    assert str(refused.value) == (
        "no scheduler takes this task: rule 1 (hpc): needs at least 2 cores; the task asks for 1 ($.cores); "
        "rule 2 (gpu): needs at least 1 GPUs; the task asks for 0 ($.gpus); rule 3 (small): takes at most 1024 MiB; "
        "the task asks for 4096 ($.memory); rule 4 (hpc): takes only tasks that ask for 'hpc' by name ($.scheduler)")
    assert [d["path"] for d in refused.value.details] == ["$.cores", "$.gpus", "$.memory", "$.scheduler"]


def test_without_rules_the_only_instance() -> None:
    assert routing.choose([], ["local"], Request("a", cores=100)) == routing.Choice("local", None)
    assert routing.Choice("local", None).label == "none" and routing.Choice("x", 2).label == "3"


def test_describe_and_explain() -> None:
    assert routing.describe(rule("hpc", cores=(2, None), memory=(None, 4096), users=["a"])) == \
        "users a; 2 <= cores; memory <= 4096 MiB -> hpc"
    assert routing.describe(rule("small")) == "any task -> small"
    assert routing.describe(rule("hpc", requested=True)) == "asked for by name -> hpc"
    assert routing.explain(RULES, INSTANCES, Request("a", gpus=1), no_groups) == [
        "rule 1 (2 <= cores -> hpc): no: $.cores: needs at least 2 cores; the task asks for 1",
        "rule 2 (1 <= gpus -> gpu): takes it",
        "goes to gpu (rule 2)"]
    assert routing.explain([], ["local"], Request("a")) == ["goes to local (the only scheduler instance)"]
    assert routing.explain(RULES, INSTANCES, Request("a", memory=2000), no_groups)[-1].startswith(
        "refused (400): no scheduler takes this task: rule 1 (hpc)")


def test_the_router_tells_its_observer() -> None:
    router = routing.Router(RULES, INSTANCES, no_groups)
    seen: list[routing.Choice] = []
    router.on_choice = seen.append
    router.choose(Request("a", cores=3))
    assert seen == [routing.Choice("hpc", 0)]


# ---- configuration ---------------------------------------------------------------------------


def load(tmp_path: Path, **tables: Any) -> configuration.Config:
    return configuration.from_document({"gateway": {"state_dir": str(tmp_path / "state")}, **tables}, tmp_path, "t")


def test_named_instances_and_rules_are_read(tmp_path: Path) -> None:
    config = load(tmp_path, schedulers={"small": {"type": "local"}, "hpc": {"type": "slurm", "poll_interval": 3}},
                  routes=[{"scheduler": "hpc", "cores": {"min": 2}, "users": ["a"]}, {"scheduler": "small"}])
    assert list(config.instances) == ["small", "hpc"]
    assert config.instances["small"] == configuration.SchedulerSettings("local", 1.0, {}, None)  # schema defaults
    assert config.instances["hpc"].poll_interval == 3.0 and not config.containers
    assert config.sections.routes == (rule("hpc", cores=(2, None), users=["a"]), rule("small"))
    assert config.scheduler_table("hpc") == "$.schedulers.hpc"


def test_the_single_scheduler_table_is_one_instance_named_after_its_type(tmp_path: Path) -> None:
    config = load(tmp_path, scheduler={"type": "local", "poll_interval": 0.5})
    assert list(config.instances) == ["local"] and config.instances["local"].poll_interval == 0.5
    assert config.scheduler_table("local") == "$.scheduler" and config.sections.routes == ()
    assert list(load(tmp_path).instances) == ["local"]


@pytest.mark.parametrize("tables, mistake", [
    ({"schedulers": {"a": {"type": "local"}}, "routes": [{"scheduler": "a"}, {"scheduler": "gpu"}]},
     r"t: \$\.routes\[1\]\.scheduler: scheduler 'gpu' is not configured \(\[\[routes\]\] rule 2; configured: a\)"),
    ({"schedulers": {"a": {"type": "local"}, "b": {"type": "local"}}},
     r"\$\.routes: with several scheduler instances \(a, b\), \[\[routes\]\] must say which tasks go where"),
    ({"routes": [{"scheduler": "local", "cores": {"min": 4, "max": 2}}]},
     r"\$\.routes\[0\]\.cores: min \(4\) is more than max \(2\)"),
    ({"routes": [{"scheduler": "local", "groups": ["no-such-group-here"]}]},
     r"\$\.routes\[0\]\.groups\[0\]: there is no Unix group named 'no-such-group-here'"),
    ({"scheduler": {"type": "local"}, "schedulers": {"a": {"type": "local"}}},
     r"\$\.scheduler: give either \[scheduler\] \(one instance\) or \[schedulers\.NAME\] tables, not both"),
    ({"schedulers": {"a": {"poll_interval": 1}}}, r"\$\.schedulers\.a: 'type' is required"),
    ({"schedulers": {"a b": {"type": "local"}}}, r"\$\.schedulers: must be a name of letters"),
    ({"routes": [{"scheduler": "local", "cores": {}}]}, r"\$\.routes\[0\]\.cores"),
    ({"routes": [{"scheduler": "local", "memory": {"least": 1}}]}, r"\$\.routes\[0\]\.memory: unknown field"),
    ({"routes": [{"cores": {"min": 1}}]}, r"\$\.routes\[0\]: 'scheduler' is required"),
])
def test_mistakes_stop_the_start_with_their_path(tmp_path: Path, tables: dict[str, Any], mistake: str) -> None:
    with pytest.raises(configuration.ConfigError, match=mistake):
        load(tmp_path, **tables)


def test_each_instance_is_its_own_plugin(tmp_path: Path) -> None:
    config = load(tmp_path, schedulers=SCHEDULERS, routes=[{"scheduler": "small"}])
    made = create_schedulers(config)
    assert [(name, s.name, s.state_dir.name, s.options["cores"]) for name, s in made.items()] == [
        ("small", "small", "small", 1), ("big", "big", "big", 2)]
    bad = load(tmp_path, schedulers={**SCHEDULERS, "big": {"type": "local", "options": {"cores": "two"}}},
               routes=[{"scheduler": "small"}])
    with pytest.raises(configuration.ConfigError, match=r"\$\.schedulers\.big\.options\.cores: must be of type"):
        create_schedulers(bad)
    unknown = load(tmp_path, schedulers={"x": {"type": "nosuch"}})
    with pytest.raises(configuration.ConfigError, match=r"\$\.schedulers\.x\.type: no scheduler plugin named"):
        create_schedulers(unknown)


# ---- in process: two local instances ----------------------------------------------------------


@pytest.fixture
async def routed(aiohttp_client: Callable[..., Awaitable[Any]], tmp_path: Path) -> Any:
    config = load(tmp_path, schedulers=SCHEDULERS, run_as={"allow_root_jobs": True},
                  tes={"images": [{"match": "*", "run": "host"}]},
                  routes=[{"scheduler": "big", "cores": {"min": 2}}, {"scheduler": "big", "requested": True,
                                                                      "users": ["alice"]},
                          {"scheduler": "small", "cores": {"max": 1}}])
    return await aiohttp_client(create_app(config))


async def _submit(client: Any, task: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await client.post("/v1/jobproxy/submit", json=task)
    return response.status, await response.json()


async def test_v1_tasks_are_routed_and_say_where(routed: Any) -> None:
    status, small = await _submit(routed, {"user": "bob", "cmd": "true"})
    assert status == 200
    status, big = await _submit(routed, {"user": "bob", "cmd": "true", "cores": 2})
    status_asked, asked = await _submit(routed, {"user": "alice", "cmd": "true", "scheduler": "big"})
    assert (status, status_asked) == (200, 200)
    states = [await wait_state(routed, body["id"], final) for body in (small, big, asked)]
    assert [(s["scheduler"], s["code"]) for s in states] == [("small", "COMPLETE"), ("big", "COMPLETE"),
                                                             ("big", "COMPLETE")]
    metrics = await (await routed.get("/metrics")).text()
    assert 'jobproxy_routed_total{rule="3",scheduler="small"} 1.0' in metrics
    assert 'jobproxy_routed_total{rule="2",scheduler="big"} 1.0' in metrics
    assert 'jobproxy_tasks_finished_total{scheduler="big",state="COMPLETE"} 2.0' in metrics
    assert 'jobproxy_poll_round_duration_seconds_count{scheduler="small"}' in metrics
    ping = await (await routed.get("/v1/jobproxy/ping")).json()
    assert ping["scheduler"] == "small, big"


async def test_a_task_no_rule_takes_answers_400_naming_why(routed: Any) -> None:
    status, body = await _submit(routed, {"user": "bob", "cmd": "true", "scheduler": "big"})
    assert status == 400 and body["error"].startswith("no routing rule lets this task ask for 'big'")
    assert body["details"] == [
        {"path": "$.cores", "message": "rule 1 (big): needs at least 2 cores; the task asks for 1"},
        {"path": "$.user", "message": "rule 2 (big): the user 'bob' is not one of alice"}]
    status, body = await _submit(routed, {"user": "bob", "cmd": "true", "scheduler": "huge"})
    assert status == 400 and body["details"][0]["path"] == "$.scheduler"
    status, body = await _submit(routed, {"user": "bob", "cmd": "true", "scheduler": "a b"})
    assert status == 400 and body["details"][0]["path"] == "$.scheduler"
    xml = b"<task><user>alice</user><cmd>true</cmd><scheduler>big</scheduler></task>"
    response = await routed.post("/v1/jobproxy/submit", data=xml, headers={"Content-Type": "application/xml"})
    assert response.status == 200, await response.text()
    assert (await wait_state(routed, (await response.json())["id"], final))["scheduler"] == "big"


async def test_tes_tasks_are_routed_by_backend_parameter(routed: Any) -> None:
    info = await (await routed.get("/ga4gh/tes/v1/service-info")).json()
    assert "scheduler" in info["tesResources_backend_parameters"]
    task = {"executors": [{"image": "any", "command": ["true"]}], "tags": {"user": "alice"},
            "resources": {"backend_parameters": {"scheduler": "big"}}}
    response = await routed.post("/ga4gh/tes/v1/tasks", json=task)
    assert response.status == 200, await response.text()
    task_id = (await response.json())["id"]
    assert (await wait_state(routed, task_id, final))["scheduler"] == "big"
    view = await (await routed.get(f"/ga4gh/tes/v1/tasks/{task_id}?view=BASIC")).json()
    assert view["state"] == "COMPLETE" and view["logs"][0]["metadata"]["scheduler"] == "big"
    assert view["resources"]["backend_parameters"] == {"scheduler": "big"}  # the request as received
    refused = {**task, "tags": {"user": "bob"}}
    response = await routed.post("/ga4gh/tes/v1/tasks", json=refused)
    body = await response.json()
    assert response.status == 400 and body["error"].startswith("no routing rule lets this task ask for 'big'")
    assert [d["path"] for d in body["details"]] == ["$.resources.cpu_cores", "$.tags.user"]
    assert "($.resources.cpu_cores)" in body["error"]


def test_instances_and_rules_need_a_restart(tmp_path: Path) -> None:
    from gateway import reload

    running = load(tmp_path, schedulers=SCHEDULERS, routes=[{"scheduler": "small"}])
    new = load(tmp_path, schedulers={**SCHEDULERS, "big": {**SCHEDULERS["big"], "poll_interval": 5}},
               routes=[{"scheduler": "big"}])
    assert reload.restart_needed(running.sections, new.sections) == ["[schedulers]", "[[routes]]"]
    assert reload.merged(running, new).sections.routes == running.sections.routes
