"""Staging by the gateway (gateway/staging), end to end: a real `jobproxy serve` on the local
scheduler, a real S3 server (SeaweedFS, etc/dev/s3.sh) and a real HTTP server on loopback.

Inputs are in the task's folder before its job starts, outputs are in S3 or on the web server
when the task is COMPLETE; a staging failure is SYSTEM_ERROR with the URL in `system_logs`."""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.staging import local

from .conftest import Gateway, cluster_env, writable_by_jobs
from .test_tes import need_bwrap

pytestmark = pytest.mark.e2e
TES = "/ga4gh/tes/v1"
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="session")
def s3_env() -> dict[str, str]:
    """The dev S3 server's endpoint and keys (etc/dev/s3.sh; its `weed` from this virtualenv)."""
    weed = shutil.which("weed", path=VENV_BIN) or shutil.which("weed")
    if weed:
        os.environ.setdefault("JOBPROXY_WEED", weed)
    return cluster_env("s3")


@pytest.fixture
def s3(s3_env: dict[str, str]) -> Any:
    boto3 = pytest.importorskip("boto3", reason="boto3 comes with snakemake-storage-plugin-s3 (the test extra)")
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=s3_env["JOBPROXY_S3_ENDPOINT"], region_name="us-east-1",
                        aws_access_key_id=s3_env["JOBPROXY_S3_ACCESS_KEY"],
                        aws_secret_access_key=s3_env["JOBPROXY_S3_SECRET_KEY"],
                        config=Config(s3={"addressing_style": "path"}))


@pytest.fixture
def bucket(s3: Any) -> Iterator[str]:
    """A fresh bucket, removed with what it holds after the test."""
    name = f"jp-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=name, Key=item["Key"])
    s3.delete_bucket(Bucket=name)


class Gate:
    """One request to /stall/...: `reached` once it has moved half of its body, then it waits
    until `opened`."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = threading.Event()


class Web:
    """What the test HTTP server shares with a test: GET /flaky/X answers 503 the first time, then
    X; GET /slow/X waits for `release`, then answers X; GET /stall/X sends the headers and half of
    X, PUT /stall/X reads half of its body, then each waits for its gate (`gate`)."""

    def __init__(self, url: str, served: Path) -> None:
        self.url, self.served = url, served
        self.release = threading.Event()
        self.hits: dict[str, int] = {}
        self._gates: dict[tuple[str, int], Gate] = {}
        self._lock = threading.Lock()

    def gate(self, path: str, n: int) -> Gate:
        """The gate of the `n`-th request (from 1) to `path` (e.g. "/stall/in.txt")."""
        with self._lock:
            return self._gates.setdefault((path, n), Gate())

    def open_all(self) -> None:
        with self._lock:
            for gate in self._gates.values():
                gate.opened.set()

    def hit(self, path: str) -> int:
        with self._lock:
            self.hits[path] = self.hits.get(path, 0) + 1
            return self.hits[path]


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[Web]:
    """A real HTTP server on loopback: GET serves a folder, PUT stores the body there (streamed,
    in place once whole)."""
    served = tmp_path / "served"
    served.mkdir()
    shared = Web("", served)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self) -> None:
            n = shared.hit(self.path)
            kind, _, rest = self.path.lstrip("/").partition("/")
            if kind == "stall":
                self._stalled_get(shared.gate(self.path, n), (served / rest).read_bytes())
                return
            if kind == "flaky" and n == 1:
                self.send_error(503)
                return
            if kind == "slow":
                shared.release.wait(60)
            if kind in ("flaky", "slow"):
                self.path = "/" + rest
            super().do_GET()

        def _stalled_get(self, gate: Gate, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            gate.reached.set()
            gate.opened.wait(120)
            with contextlib.suppress(OSError):  # the client may be gone (killed)
                self.wfile.write(body[len(body) // 2:])

        def do_PUT(self) -> None:
            n = shared.hit(self.path)
            kind, _, rest = self.path.lstrip("/").partition("/")
            stall = shared.gate(self.path, n) if kind == "stall" else None
            target = served / (rest if stall is not None else self.path.lstrip("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            size = left = int(self.headers["Content-Length"])
            partial = target.with_name(f".{target.name}.{n}")  # renamed into place once whole
            with open(partial, "wb") as out:
                while left:
                    want = min(left, 1 << 20)
                    if stall is not None and not stall.reached.is_set():
                        if size - left >= size // 2:
                            stall.reached.set()
                            stall.opened.wait(120)
                        else:
                            want = min(want, size // 2 - (size - left))
                    try:
                        chunk = self.rfile.read(want)
                    except OSError:
                        chunk = b""
                    if not chunk:  # the client went away: nothing is stored
                        return
                    out.write(chunk)
                    left -= len(chunk)
            partial.replace(target)
            self.send_response(201)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shared.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield shared
    shared.release.set()
    shared.open_all()
    server.shutdown()


@pytest.fixture
def web(web_server: Web) -> tuple[str, Path]:
    return web_server.url, web_server.served


def start(gateway_factory: Callable[..., Gateway], s3_env: dict[str, str], staging: str = "",
          secret: str | None = None, s3_extra: str = "", sections: str = "",
          scheduler: str = 'type = "local"\npoll_interval = 0.2', http: str = "",
          allow_hosts: str = '["127.0.0.1"]') -> Gateway:
    """A gateway staging from the dev S3 server; `allow_hosts`: the test's HTTP server on loopback."""
    need_bwrap()
    config = f"""
[scheduler]
{scheduler}
{sections}
[tes]
images = [{{ match = "*", run = "host" }}]
[staging]
retries = 1
backoff = 0.1
{staging}
[staging.http]
allow_hosts = {allow_hosts}
{http}
[staging.s3]
endpoint_url = "{s3_env['JOBPROXY_S3_ENDPOINT']}"
region = "us-east-1"
addressing_style = "path"
access_key_id = "{s3_env['JOBPROXY_S3_ACCESS_KEY']}"
secret_access_key = "{secret or s3_env['JOBPROXY_S3_SECRET_KEY']}"
{s3_extra}
"""
    return gateway_factory(config).start()


def create(gateway: Gateway, task: dict[str, Any]) -> str:
    status, _, body = gateway.request("POST", f"{TES}/tasks", json.dumps(task).encode(),
                                      {"Content-Type": "application/json"})
    assert status == 200, body
    return str(json.loads(body)["id"])


def refused(gateway: Gateway, task: dict[str, Any]) -> dict[str, Any]:
    status, _, body = gateway.request("POST", f"{TES}/tasks", json.dumps(task).encode(),
                                      {"Content-Type": "application/json"})
    assert status == 400, body
    return dict(json.loads(body)["details"][0])


def finished(gateway: Gateway, task_id: str, timeout: float = 90) -> dict[str, Any]:
    gateway.wait(task_id, timeout=timeout)
    status, _, body = gateway.request("GET", f"{TES}/tasks/{task_id}?view=FULL")
    assert status == 200, body
    return dict(json.loads(body))


def shell(script: str) -> dict[str, Any]:
    return {"image": "ubuntu", "command": ["/bin/bash", "-c", script]}


def test_s3_files_folders_and_wildcards(gateway_factory: Callable[..., Gateway], s3_env: dict[str, str],
                                        s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="in/one.txt", Body=b"one\n")
    s3.put_object(Bucket=bucket, Key="tree/a.txt", Body=b"A\n")
    s3.put_object(Bucket=bucket, Key="tree/sub/b.txt", Body=b"B\n")
    gateway = start(gateway_factory, s3_env)
    big = 6 * 1048576 + 3  # below one part (8 MiB): one PUT
    task_id = create(gateway, {
        "inputs": [{"url": f"s3://{bucket}/in/one.txt", "path": "/data/one.txt", "streamable": True},
                   {"url": f"s3://{bucket}/tree", "path": "/data/tree", "type": "DIRECTORY"},
                   {"content": "inline\n", "path": "/data/inline.txt"}],
        "outputs": [{"url": f"s3://{bucket}/out/sum.txt", "path": "/out/sum.txt"},
                    {"url": f"s3://{bucket}/out/folder", "path": "/out/folder", "type": "DIRECTORY"},
                    {"url": f"s3://{bucket}/out/logs", "path": "/out/logs/*.log", "path_prefix": "/out/logs"},
                    {"url": f"s3://{bucket}/out/big.bin", "path": "/out/big.bin"}],
        "executors": [shell("cat /data/one.txt /data/tree/a.txt /data/tree/sub/b.txt /data/inline.txt > /out/sum.txt;"
                            " mkdir -p /out/folder/deep /out/logs; echo D > /out/folder/deep/d.txt;"
                            " echo x > /out/logs/x.log; echo y > /out/logs/y.log; echo no > /out/logs/z.txt;"
                            f" head -c {big} /dev/zero > /out/big.bin; ls -l /data/one.txt")]})
    full = finished(gateway, task_id)
    assert full["state"] == "COMPLETE", full
    got = {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in
           ("out/sum.txt", "out/folder/deep/d.txt", "out/logs/x.log", "out/logs/y.log")}
    assert got == {"out/sum.txt": b"one\nA\nB\ninline\n", "out/folder/deep/d.txt": b"D\n",
                   "out/logs/x.log": b"x\n", "out/logs/y.log": b"y\n"}
    assert s3.head_object(Bucket=bucket, Key="out/big.bin")["ContentLength"] == big
    assert "out/logs/z.txt" not in [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    log = full["logs"][0]
    assert log["outputs"] == [
        {"url": f"s3://{bucket}/out/sum.txt", "path": "/out/sum.txt", "size_bytes": "15"},
        {"url": f"s3://{bucket}/out/folder/deep/d.txt", "path": "/out/folder/deep/d.txt", "size_bytes": "2"},
        {"url": f"s3://{bucket}/out/logs/x.log", "path": "/out/logs/x.log", "size_bytes": "2"},
        {"url": f"s3://{bucket}/out/logs/y.log", "path": "/out/logs/y.log", "size_bytes": "2"},
        {"url": f"s3://{bucket}/out/big.bin", "path": "/out/big.bin", "size_bytes": str(big)}]
    assert log["logs"][0]["exit_code"] == 0 and log["system_logs"] == []
    assert gateway.state(task_id)["code"] == "COMPLETE"
    # no part file is left behind in the task's root
    assert not list(Path(gateway.workdir).rglob("*" + local.PART_SUFFIX))


def test_s3_multipart_upload_of_large_outputs(gateway_factory: Callable[..., Gateway], s3_env: dict[str, str],
                                              s3: Any, bucket: str) -> None:
    gateway = start(gateway_factory, s3_env, s3_extra="part_bytes = 5242880")  # 12 MiB: three parts
    size = 12 * 1048576 + 1
    task_id = create(gateway, {"outputs": [{"url": f"s3://{bucket}/big", "path": "/out/big"}],
                               "executors": [shell(f"head -c {size} /dev/urandom > /out/big; sha256sum /out/big")]})
    full = finished(gateway, task_id)
    assert full["state"] == "COMPLETE", full
    head = s3.head_object(Bucket=bucket, Key="big")
    assert head["ContentLength"] == size and head["ETag"].strip('"').endswith("-3")  # three parts
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_file_wildcards_are_copied_by_the_job(gateway_factory: Callable[..., Gateway], s3_env: dict[str, str],
                                              tmp_path: Path) -> None:
    out = writable_by_jobs(tmp_path / "results")
    gateway = start(gateway_factory, s3_env, sections="[paths]\nroots = [\"/\"]")
    task_id = create(gateway, {
        "outputs": [{"url": f"file://{out}", "path": "/data/run/*/*.csv", "path_prefix": "/data/run/"}],
        "executors": [shell("mkdir -p /data/run/a /data/run/b; echo 1 > /data/run/a/x.csv; echo 2 > /data/run/b/y.csv;"
                            " echo no > /data/run/a/z.txt; ln -s /etc/passwd /data/run/a/link.csv")]})
    full = finished(gateway, task_id)
    assert full["state"] == "COMPLETE", full
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == ["a/x.csv", "b/y.csv"]
    assert (out / "a" / "x.csv").read_text() == "1\n" and (out / "b" / "y.csv").read_text() == "2\n"


@pytest.mark.slurm
def test_s3_staging_on_slurm(gateway_factory: Callable[..., Gateway], s3_env: dict[str, str], s3: Any,
                             bucket: str) -> None:
    """On a scheduler that is polled, each round sees the ended job again while its outputs are
    sent: the task still ends once, after the upload."""
    from . import backend_slurm
    backend_slurm.prepare()  # the dev cluster (skips, or fails in CI, when it cannot run)
    s3.put_object(Bucket=bucket, Key="in.txt", Body=b"on slurm\n")
    gateway = start(gateway_factory, s3_env, scheduler='type = "slurm"\npoll_interval = 0.3')
    task_id = create(gateway, {"inputs": [{"url": f"s3://{bucket}/in.txt", "path": "/data/in.txt"}],
                               "outputs": [{"url": f"s3://{bucket}/out.txt", "path": "/data/out/out.txt"}],
                               "executors": [shell("tr a-z A-Z < /data/in.txt > /data/out/out.txt")]})
    full = finished(gateway, task_id, timeout=150)
    assert full["state"] == "COMPLETE", full
    assert s3.get_object(Bucket=bucket, Key="out.txt")["Body"].read() == b"ON SLURM\n"
    assert full["logs"][0]["metadata"]["scheduler"] == "slurm" and full["logs"][0]["system_logs"] == []


def test_a_canceled_upload_is_aborted(gateway_factory: Callable[..., Gateway], s3_env: dict[str, str],
                                      s3: Any, bucket: str) -> None:
    """Canceled while its output is being sent in parts: no object, and no unfinished multipart upload."""
    gateway = start(gateway_factory, s3_env, s3_extra="part_bytes = 5242880")
    task_id = create(gateway, {"outputs": [{"url": f"s3://{bucket}/huge", "path": "/out/huge"}],
                               "executors": [shell("head -c 1500M /dev/zero > /out/huge")]})
    gateway.wait(task_id, lambda s: "sending outputs" in s["description"], timeout=120)
    deadline = time.monotonic() + 30
    while not s3.list_multipart_uploads(Bucket=bucket).get("Uploads") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket)["Uploads"]] == ["huge"]  # under way
    status, _, _ = gateway.request("POST", f"{TES}/tasks/{task_id}:cancel")
    assert status == 200 and gateway.state(task_id)["code"] == "CANCELED"
    deadline = time.monotonic() + 30
    while s3.list_multipart_uploads(Bucket=bucket).get("Uploads") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=bucket).get("Contents", []) == []
    full = finished(gateway, task_id)
    assert full["state"] == "CANCELED" and full["logs"][0]["outputs"] == []


def test_http_get_and_put(gateway_factory: Callable[..., Gateway], s3_env: dict[str, str],
                          web: tuple[str, Path]) -> None:
    url, served = web
    (served / "in.txt").write_text("over http\n")
    gateway = start(gateway_factory, s3_env, http="allow_put = true")
    task_id = create(gateway, {
        "inputs": [{"url": f"{url}/in.txt", "path": "/data/in/in.txt"}],
        "outputs": [{"url": f"{url}/results/out.txt", "path": "/data/out.txt"},
                    {"url": f"{url}/results/many", "path": "/data/many/*.txt", "path_prefix": "/data/many/"}],
        "executors": [shell("tr a-z A-Z < /data/in/in.txt > /data/out.txt; mkdir -p /data/many;"
                            " echo 1 > /data/many/a.txt; echo 2 > /data/many/b.txt")]})
    full = finished(gateway, task_id)
    assert full["state"] == "COMPLETE", full
    assert (served / "results" / "out.txt").read_text() == "OVER HTTP\n"
    assert (served / "results" / "many" / "a.txt").read_text() == "1\n"
    assert (served / "results" / "many" / "b.txt").read_text() == "2\n"
    assert [o["url"] for o in full["logs"][0]["outputs"]] == [
        f"{url}/results/out.txt", f"{url}/results/many/a.txt", f"{url}/results/many/b.txt"]

    missing = create(gateway, {"inputs": [{"url": f"{url}/nothing.txt", "path": "/data/x"}],
                               "executors": [shell("true")]})
    full = finished(gateway, missing)
    assert full["state"] == "SYSTEM_ERROR" and full["logs"][0]["logs"] == [], full
    assert any(f"inputs[0]: fetching {url}/nothing.txt failed: HTTP 404" in line
               for line in full["logs"][0]["system_logs"]), full
    assert gateway.state(missing)["code"] == "SYSTEM_ERROR"


def test_retries_cancel_and_restart_while_staging(gateway_factory: Callable[..., Gateway],
                                                  s3_env: dict[str, str], web_server: Web) -> None:
    (web_server.served / "in.txt").write_text("data\n")
    gateway = start(gateway_factory, s3_env)
    flaky = create(gateway, {"inputs": [{"url": f"{web_server.url}/flaky/in.txt", "path": "/data/in.txt"}],
                             "executors": [shell("cat /data/in.txt")]})
    full = finished(gateway, flaky)
    assert full["state"] == "COMPLETE" and full["logs"][0]["logs"][0]["stdout"] == "data\n", full
    assert web_server.hits["/flaky/in.txt"] == 2  # a 503, then the file

    waiting = {"inputs": [{"url": f"{web_server.url}/slow/in.txt", "path": "/data/in.txt"}],
               "executors": [shell("cat /data/in.txt")]}
    canceled = create(gateway, waiting)
    gateway.wait(canceled, lambda s: s["code"] == "INITIALIZING")
    status, _, _ = gateway.request("POST", f"{TES}/tasks/{canceled}:cancel")
    assert status == 200 and gateway.state(canceled)["code"] == "CANCELED"

    # the gateway stops while a task waits for its inputs: started again, it fetches them again
    resumed = create(gateway, waiting)
    gateway.wait(resumed, lambda s: s["code"] == "INITIALIZING")
    gateway.stop(kill=True)
    gateway.start()
    assert gateway.state(resumed)["code"] == "INITIALIZING"
    web_server.release.set()
    full = finished(gateway, resumed)
    assert full["state"] == "COMPLETE" and full["logs"][0]["logs"][0]["stdout"] == "data\n", full
    full = finished(gateway, canceled)
    assert full["state"] == "CANCELED" and full["logs"][0]["logs"] == [], full


def test_staging_failures_are_system_errors(gateway_factory: Callable[..., Gateway], s3_env: dict[str, str],
                                            s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="ten.txt", Body=b"0123456789")
    wrong = start(gateway_factory, s3_env, secret="not-the-secret")
    task_id = create(wrong, {"inputs": [{"url": f"s3://{bucket}/ten.txt", "path": "/data/ten.txt"}],
                             "executors": [shell("true")]})
    full = finished(wrong, task_id)
    assert full["state"] == "SYSTEM_ERROR" and full["logs"][0]["logs"] == [], full
    assert any(f"fetching s3://{bucket}/ten.txt failed: S3 SignatureDoesNotMatch" in line
               for line in full["logs"][0]["system_logs"]), full
    wrong.stop()

    limited = start(gateway_factory, s3_env, staging="max_bytes = 9")
    too_big = create(limited, {"inputs": [{"url": f"s3://{bucket}/ten.txt", "path": "/data/ten.txt"}],
                               "executors": [shell("true")]})
    no_key = create(limited, {"inputs": [{"url": f"s3://{bucket}/nothing", "path": "/data/n"}],
                              "executors": [shell("true")]})
    too_much = create(limited, {"outputs": [{"url": f"s3://{bucket}/too-much", "path": "/out/x"}],
                                "executors": [shell("echo 0123456789 > /out/x")]})
    missing = create(limited, {"outputs": [{"url": f"s3://{bucket}/never", "path": "/out/never"}],
                               "executors": [shell("true")]})
    for task_id, state, line in (
            (too_big, "SYSTEM_ERROR", f"fetching s3://{bucket}/ten.txt failed: exceeds the staging limit of 9 bytes"),
            (no_key, "SYSTEM_ERROR", f"fetching s3://{bucket}/nothing failed: S3 NoSuchKey"),
            (too_much, "SYSTEM_ERROR", f"sending /out/x to s3://{bucket}/too-much failed: exceeds the staging limit"),
            (missing, "EXECUTOR_ERROR", "outputs[0]: /out/never does not exist")):
        full = finished(limited, task_id)
        assert full["state"] == state, full
        assert any(line in entry for entry in full["logs"][0]["system_logs"]), full
        assert limited.state(task_id)["code"] == state
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["ten.txt"]


def test_refusals(gateway_factory: Callable[..., Gateway], s3_env: dict[str, str], web: tuple[str, Path]) -> None:
    url, _ = web
    gateway = start(gateway_factory, s3_env)
    run = [shell("true")]
    for task, path, message in (
            ({"outputs": [{"url": f"{url}/x", "path": "/out/x"}]}, "$.outputs[0].url",
             "does not send outputs over HTTP ([staging.http] allow_put)"),
            ({"inputs": [{"url": f"{url}/d", "path": "/d", "type": "DIRECTORY"}]}, "$.inputs[0].type",
             "a DIRECTORY input needs an s3:// or file:// URL"),
            ({"outputs": [{"url": "s3://bucket/x", "path": "/out/*.txt"}]}, "$.outputs[0].path_prefix",
             "is required for a path with wildcards"),
            ({"outputs": [{"url": "s3://bucket/x", "path": "/out/*.txt", "path_prefix": "/data"}]},
             "$.outputs[0].path_prefix", "must be a beginning of the path"),
            ({"inputs": [{"url": "s3://a/x", "path": "/x"}]}, "$.inputs[0].url", "is not an S3 bucket name"),
            ({"inputs": [{"url": "s3://bucket", "path": "/x"}]}, "$.inputs[0].url", "names a bucket, not an object"),
    ):
        detail = refused(gateway, {**task, "executors": run})
        assert detail["path"] == path and message in detail["message"], detail
    _, _, body = gateway.request("GET", f"{TES}/service-info")
    assert "Streamable inputs are accepted and staged like the others" in json.loads(body)["description"]


def test_snakemake_workflow_in_s3(gateway_factory: Callable[..., Gateway], s3_env: dict[str, str], s3: Any,
                                  bucket: str, tmp_path: Path) -> None:
    """Snakemake's TES executor with its S3 storage plugin: the workflow's files live in S3. The
    plugin moves them inside each job (Snakemake does not give storage files to TES as inputs), so
    the jobs reach the S3 server themselves, with the keys Snakemake passes them."""
    from .test_tes_clients import TEST_DEPS, chain_snakefile, need, need_deps
    need("bwrap")
    wheels = need_deps(TEST_DEPS / "wheels", "the wheels of Snakemake's storage plugins")
    s3.put_object(Bucket=bucket, Key="wf/data/in.txt", Body=b"input\n")
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
               "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    gateway = gateway_factory(f"""
[scheduler]
type = "local"
poll_interval = 0.2
[run_as]
allow_root_jobs = true
[tes]
images = [{{ match = "snakemake/snakemake:*", run = "host" }}]
host_readable = ["{sys.prefix}", "{wheels}"]
""", env=offline).start()
    project = tmp_path / "project"
    project.mkdir()
    (project / "Snakefile").write_text(chain_snakefile("first", "second"))
    result = subprocess.run(
        [f"{VENV_BIN}/snakemake", "--executor", "tes", "--tes-url", f"{gateway.url}/ga4gh/tes", "--jobs", "1",
         "--default-storage-provider", "s3", "--default-storage-prefix", f"s3://{bucket}/wf",
         "--storage-s3-endpoint-url", s3_env["JOBPROXY_S3_ENDPOINT"],
         "--storage-s3-access-key", s3_env["JOBPROXY_S3_ACCESS_KEY"],
         "--storage-s3-secret-key", s3_env["JOBPROXY_S3_SECRET_KEY"],
         "--seconds-between-status-checks", "1"],
        cwd=project, capture_output=True, text=True, timeout=900,
        env={**os.environ, **offline})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:] + gateway.log.read_text()[-3000:]
    body = s3.get_object(Bucket=bucket, Key="wf/results/c.txt")["Body"].read()
    assert body == b"input\nfirst\nsecond\n"
    status, _, listed = gateway.request("GET", f"{TES}/tasks?view=BASIC")
    tasks = json.loads(listed)["tasks"]
    assert status == 200 and [t["state"] for t in tasks] == ["COMPLETE", "COMPLETE"]


def test_http_inputs_reach_only_public_hosts_unless_allowed(gateway_factory: Callable[..., Gateway],
                                                            s3_env: dict[str, str], web: tuple[str, Path]) -> None:
    url, served = web
    (served / "in.txt").write_text("private\n")
    gateway = start(gateway_factory, s3_env, allow_hosts="[]")  # the default: the test server's loopback is out
    task_id = create(gateway, {"inputs": [{"url": f"{url}/in.txt", "path": "/data/in.txt"}],
                               "executors": [shell("cat /data/in.txt")]})
    full = finished(gateway, task_id)
    assert full["state"] == "SYSTEM_ERROR" and full["logs"][0]["logs"] == [], full
    assert any(f"fetching {url}/in.txt failed: not fetched or sent: 127.0.0.1 is not a public address, and "
               "[staging.http] allow_hosts does not name it" in line for line in full["logs"][0]["system_logs"]), full
