"""cgroup file writes, against fake hierarchies (v2 and v1) and, where writable, the real one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from schedulers.local import cgroups


def _fake_v2(root: Path) -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    return root


def test_v2_detected_and_limits_written(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path / "cg")
    found = cgroups.detect(root)
    assert isinstance(found, cgroups.CgroupsV2)
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory"
    assert (root / "jobproxy" / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory"
    procs = found.create("t1", memory_bytes=200 * 2**20, cpus=[1, 0])
    group = root / "jobproxy" / "t1"
    assert procs == [group / "cgroup.procs"]
    assert (group / "memory.max").read_text() == str(200 * 2**20)
    assert (group / "memory.swap.max").read_text() == "0"
    assert (group / "cpu.max").read_text() == "200000 100000"
    assert (group / "cpuset.cpus").read_text() == "0,1"
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    assert found.oom_kills("t1") == 1


def test_v2_without_limits_writes_none(tmp_path: Path) -> None:
    found = cgroups.detect(_fake_v2(tmp_path / "cg"))
    assert found is not None
    found.create("t2", memory_bytes=None, cpus=[])
    assert sorted(p.name for p in (tmp_path / "cg" / "jobproxy" / "t2").iterdir()) == []


def test_hybrid_v2_without_controllers_falls_back_to_v1(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "unified").mkdir(parents=True)
    (root / "unified" / "cgroup.controllers").write_text("\n")
    for controller in ("memory", "cpu", "cpuset"):
        (root / controller).mkdir()
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    found = cgroups.detect(root)
    assert isinstance(found, cgroups.CgroupsV1)
    procs = found.create("t1", memory_bytes=1048576, cpus=[1])
    assert [p.parent.parent.parent.name for p in procs] == ["memory", "cpu", "cpuset"]
    assert (root / "memory" / "jobproxy" / "t1" / "memory.limit_in_bytes").read_text() == "1048576"
    assert (root / "cpu" / "jobproxy" / "t1" / "cpu.cfs_quota_us").read_text() == "100000"
    assert (root / "cpuset" / "jobproxy" / "cpuset.mems").read_text() == "0"
    assert (root / "cpuset" / "jobproxy" / "t1" / "cpuset.cpus").read_text() == "1"
    (root / "memory" / "jobproxy" / "t1" / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert found.oom_kills("t1") == 2


def test_nothing_writable_means_none(tmp_path: Path) -> None:
    assert cgroups.detect(tmp_path) is None


def test_real_hierarchy_enforces_memory(tmp_path: Path) -> None:
    found = cgroups.detect()
    if found is None:
        pytest.skip("no writable cgroup hierarchy on this machine")
    name = f"test-{os.getpid()}"
    procs = found.create(name, memory_bytes=64 * 2**20, cpus=[0])
    launcher = subprocess.Popen([sys.executable, "-I", str(Path(cgroups.__file__).with_name("launcher.py")), "--serve"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert launcher.stdin is not None and launcher.stdout is not None
    try:
        hog = "import time; b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"
        job = tmp_path / "job.sh"
        job.write_text(f'exec {sys.executable} -c "{hog}"\n')
        request = {"op": "run", "id": name, "join": [str(p) for p in procs], "cpus": [0], "rlimit_as": 0, "user": None,
                   "stdout": str(tmp_path / "out"), "stderr": str(tmp_path / "err"), "script": str(job),
                   "env": dict(os.environ), "cwd": str(tmp_path)}
        launcher.stdin.write(json.dumps(request).encode() + b"\n")
        launcher.stdin.flush()
        started = json.loads(launcher.stdout.readline())
        assert (started["op"], started["id"]) == ("started", name), started
        ended = json.loads(launcher.stdout.readline())
        assert (ended["op"], ended["pid"]) == ("exit", started["pid"])
        assert os.waitstatus_to_exitcode(ended["status"]) == -9, (tmp_path / "err").read_text()
        assert found.oom_kills(name) >= 1
    finally:
        launcher.stdin.close()
        launcher.wait(timeout=30)
        found.kill(name)
        time.sleep(0.1)
        found.remove(name)


def test_pool_reuses_a_group_per_cpu_set_and_counts_oom_kills_per_job(tmp_path: Path) -> None:
    """Against a fake v1 hierarchy: the same group for the next job on the same CPUs, its memory
    limit rewritten (or lifted), OOM kills as a difference; a group with a process left is retired."""
    from schedulers.local.cgpool import CgroupPool

    root = tmp_path / "cg"
    (root / "unified").mkdir(parents=True)
    for controller in ("memory", "cpu", "cpuset"):
        (root / controller).mkdir()
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (root / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    found = cgroups.detect(root)
    assert isinstance(found, cgroups.CgroupsV1)
    pool = CgroupPool(found, "ptest")
    first = pool.take([1], 1048576)
    memory = root / "memory" / "jobproxy" / first.name
    assert first.name == "ptest-1-0" and first.procs[0] == str(memory / "cgroup.procs")
    assert (memory / "memory.limit_in_bytes").read_text() == "1048576"
    assert (root / "cpuset" / "jobproxy" / first.name / "cpuset.cpus").read_text() == "1"
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert pool.finish(first, [1]) == 2
    second = pool.take([1], None)
    assert second.name == first.name and second.oom_base == 2
    assert (memory / "memory.limit_in_bytes").read_text() == "-1"
    other = pool.take([0], None)
    assert other.name == "ptest-0-0"
    (memory / "cgroup.procs").write_text("4242\n")  # a process outlived its job
    assert pool.finish(second, [1]) == 0
    third = pool.take([1], None)
    assert third.name == "ptest-1-1"
    # what the caller knows (the launcher looked when it reaped the job) stands for the file
    assert pool.finish(third, [1], busy=True) == 0
    fourth = pool.take([1], None)
    assert fourth.name == "ptest-1-2"
    (memory.parent / fourth.name / "cgroup.procs").write_text("4243\n")
    assert pool.finish(fourth, [1], busy=False) == 0
    assert pool.take([1], None).name == fourth.name
