"""Who may do what: tokens (401), ownership (403 / 404), admins, and the CLI that makes tokens."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import auth
from gateway import config as configuration
from gateway.app import create_app

from .conftest import final, wait_state

TOKENS = {"alice": "jp_alice-secret", "bob": "jp_bob-secret", "root-admin": "jp_admin-secret"}


def auth_config(tmp_path: Path) -> configuration.Config:
    tokens = [{"user": user, "sha256": auth.hash_token(token), "admin": user == "root-admin"}
              for user, token in TOKENS.items()]
    document = {"gateway": {"state_dir": str(tmp_path / "state")}, "auth": {"enabled": True, "tokens": tokens},
                "scheduler": {"poll_interval": 0.1}}
    return configuration.from_document(document, tmp_path, "test")


def as_(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[user]}"}


@pytest.fixture
async def secured(aiohttp_client: Any, tmp_path: Path) -> Any:
    return await aiohttp_client(create_app(auth_config(tmp_path)))


async def submit(client: Any, user: str, owner: str | None = None) -> str:
    response = await client.post("/v1/jobproxy/submit", json={"user": owner or user, "cmd": "true"}, headers=as_(user))
    assert response.status == 200, await response.text()
    return str((await response.json())["id"])


def test_token_cli_prints_a_token_and_its_hash() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "token", "create", "--user", "carol", "--admin"],
                         capture_output=True, text=True, check=True).stdout
    token = out.split("): ")[1].split()[0]
    assert token.startswith("jp_") and len(token) > 40
    assert f'sha256 = "{auth.hash_token(token)}", admin = true' in out and 'user = "carol"' in out


async def test_requests_without_a_valid_token_get_401(secured: Any) -> None:
    task_id = await submit(secured, "alice")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Token " + TOKENS["alice"]},
                    {"Authorization": "Basic !!!"}):
        for method, path in [("POST", "/v1/jobproxy/submit"), ("GET", "/v1/jobproxy/state"),
                             ("GET", f"/v1/jobproxy/state/{task_id}"), ("GET", "/v1/jobproxy/state/unknown"),
                             ("DELETE", f"/v1/jobproxy/delete/{task_id}"),
                             ("POST", "/ga4gh/tes/v1/tasks"), ("GET", "/ga4gh/tes/v1/tasks"),
                             ("GET", f"/ga4gh/tes/v1/tasks/{task_id}"),
                             ("POST", f"/ga4gh/tes/v1/tasks/{task_id}:cancel"),
                             ("GET", "/v1/tasks"), ("GET", f"/v1/tasks/{task_id}")]:
            response = await secured.request(method, path, headers=headers, json={"user": "alice", "cmd": "x"})
            assert response.status == 401, (method, path, headers)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert task_id not in await response.text()  # never a hint whether an id exists
    for public in ("/v1/jobproxy/ping", "/v1/openapi.json", "/ga4gh/tes/v1/service-info", "/v1/service-info"):
        assert (await secured.get(public)).status == 200, public


async def test_basic_credentials_with_the_token_as_password(secured: Any) -> None:
    good = base64.b64encode(f"alice:{TOKENS['alice']}".encode()).decode()
    wrong_user = base64.b64encode(f"bob:{TOKENS['alice']}".encode()).decode()
    assert (await secured.get("/v1/jobproxy/state", headers={"Authorization": f"Basic {good}"})).status == 200
    assert (await secured.get("/v1/jobproxy/state", headers={"Authorization": f"Basic {wrong_user}"})).status == 401


async def test_users_see_and_touch_only_their_own_tasks(secured: Any) -> None:
    alices = await submit(secured, "alice")
    bobs = await submit(secured, "bob")
    response = await secured.post("/v1/jobproxy/submit", json={"user": "bob", "cmd": "true"}, headers=as_("alice"))
    assert response.status == 403 and "only for yourself" in (await response.json())["error"]
    for user, own, other in (("alice", alices, bobs), ("bob", bobs, alices)):
        listed = await (await secured.get("/v1/jobproxy/state", headers=as_(user))).json()
        assert [s["id"] for s in listed["state"]] == [own]
        snooping = await (await secured.get(f"/v1/jobproxy/state?user={'bob' if user == 'alice' else 'alice'}",
                                            headers=as_(user))).json()
        assert [s["id"] for s in snooping["state"]] == [own]
        tes_listed = await (await secured.get("/ga4gh/tes/v1/tasks", headers=as_(user))).json()
        assert [t["id"] for t in tes_listed["tasks"]] == [own]
        for method, path in (("GET", f"/v1/jobproxy/state/{other}"), ("GET", f"/ga4gh/tes/v1/tasks/{other}"),
                             ("POST", f"/ga4gh/tes/v1/tasks/{other}:cancel"),
                             ("DELETE", f"/v1/jobproxy/delete/{other}")):
            response = await secured.request(method, path, headers=as_(user))
            unknown = await secured.request(method, path.replace(other, "0" * len(other)), headers=as_(user))
            assert response.status == unknown.status == 404
            assert ((await response.json())["error"].replace(other, "X")
                    == (await unknown.json())["error"].replace("0" * len(other), "X"))
        assert (await secured.get(f"/v1/jobproxy/state/{own}", headers=as_(user))).status == 200
    assert (await secured.get(f"/v1/jobproxy/state/{alices}", headers=as_("alice"))).status == 200


async def test_admins_see_all_filter_by_user_and_submit_for_anyone(secured: Any) -> None:
    alices = await submit(secured, "alice")
    for_bob = await submit(secured, "root-admin", owner="bob")
    everything = await (await secured.get("/v1/jobproxy/state", headers=as_("root-admin"))).json()
    assert {s["id"] for s in everything["state"]} == {alices, for_bob}
    bobs = await (await secured.get("/v1/jobproxy/state?user=bob", headers=as_("root-admin"))).json()
    assert [s["id"] for s in bobs["state"]] == [for_bob]
    await wait_state(secured, for_bob, final, headers=as_("bob"))
    response = await secured.get(f"/v1/jobproxy/state/{for_bob}", headers=as_("bob"))
    assert response.status == 200 and (await response.json())["user"] == "bob"
    assert (await secured.delete(f"/v1/jobproxy/delete/{alices}", headers=as_("root-admin"))).status == 204


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])
def test_remote_address_without_auth_refuses_to_start(tmp_path: Path, host: str) -> None:
    with pytest.raises(configuration.ConfigError, match=f"refusing to listen on {host} with auth off"):
        configuration.from_document({"gateway": {"host": host}}, tmp_path, "t")
    allowed = configuration.from_document({"gateway": {"host": host, "allow_remote_without_auth": True}}, tmp_path, "t")
    assert allowed.host == host


def test_serve_on_all_addresses_without_auth_exits_with_the_reason(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "refusing to listen on 0.0.0.0" in result.stderr


def test_bad_token_hash_in_config_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(configuration.ConfigError, match=r"\$\.auth\.tokens\[0\]\.sha256: must be the 64 hex digits"):
        configuration.from_document({"auth": {"tokens": [{"user": "a", "sha256": "abc"}]}}, tmp_path, "t")


def test_token_hashes_only_in_config() -> None:
    token = auth.new_token()
    authenticator = auth.Authenticator([{"user": "u", "sha256": auth.hash_token(token), "admin": False}])
    identity = authenticator.identify(f"Bearer {token}")
    assert identity == auth.Identity("u", False)
    assert json.dumps({"sha256": auth.hash_token(token)}).find(token) == -1
