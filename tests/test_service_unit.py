"""etc/jobproxy.service: what the gateway relies on (notify, a graceful stop that spares the jobs)
and no hardening option that would break users' jobs; `systemd-analyze verify` where installed."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "etc" / "jobproxy.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment, method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_fits_the_gateway() -> None:
    service = _unit()["Service"]
    assert (service["Type"], service["NotifyAccess"]) == ("notify", "main")  # gateway/sdnotify.py sends READY=1
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # systemctl reload: gateway/reload.py
    assert service["KillMode"] == "process"  # SIGTERM to the gateway only: its jobs outlive a restart
    assert service["User"] == service["Group"] == "jobproxy"
    argv = service["ExecStart"].split()
    assert argv[0].endswith("/bin/jobproxy") and argv[1:3] == ["serve", "--config"]
    assert service["StateDirectory"] == "jobproxy" and service["WorkingDirectory"] == "/var/lib/jobproxy"


def test_no_hardening_that_breaks_jobs() -> None:
    service = _unit()["Service"]
    assert service["ProtectSystem"] == "full"  # not strict: jobs write users' folders
    for key in ("ProtectHome", "PrivateTmp", "ProtectControlGroups", "NoNewPrivileges", "RestrictNamespaces",
                "MemoryDenyWriteExecute", "SystemCallFilter", "RestrictAddressFamilies", "PrivateDevices"):
        assert key not in service, f"{key} would also apply to the jobs the gateway starts"


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    jobproxy = shutil.which("jobproxy", path=str(Path(sys.executable).parent))
    assert jobproxy is not None
    unit = tmp_path / "jobproxy.service"
    unit.write_text(UNIT.read_text().replace("/opt/jobproxy/.venv/bin/jobproxy", jobproxy))
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr


def test_readme_explains_it() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "etc/jobproxy.service" in readme and "## Running as a service" in readme
