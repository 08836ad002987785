"""Site policy checked before a task is accepted: per-task limits, the Unix user a task runs as,
and the folders its output files and volumes may lie in. Each refusal names the field and the rule.

It also says which Unix account jobs run as when they do not run as their users: a gateway
running as root with auth off never runs jobs as root (anyone who can reach it could), but as an
unprivileged account (`nobody`, or `[run_as] account`), unless the admin opts in with
`[run_as] allow_root_jobs`. Without auth and without run-as, output paths are confined to the
task root unless `[paths] roots` says otherwise.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pwd
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path

from schedulers import accounts
from schedulers.base import Task, path_within

from .config import Config, ConfigError
from .responses import ApiError

UNITS = {"cores": "cores", "memory": "MiB", "cputime": "CPU seconds", "gpus": "GPUs"}
log = logging.getLogger(__name__)


def _refuse(status: int, path: str, message: str) -> ApiError:
    return ApiError(status, f"{path}: {message}", [{"path": path, "message": message}])


def check(config: Config, task: Task) -> None:
    check_limits(config, task)
    check_options(config, task)
    if config.run_as.get("enabled"):
        check_run_as(config, task.user)
    roots = confinement_roots(config)
    if roots is not None:
        check_paths(roots, task)


#: The account jobs of a root gateway with auth off run as, unless the admin names another.
DEFAULT_ACCOUNT = "nobody"


def confinement_roots(config: Config) -> tuple[str, ...] | None:
    """The folders output paths (stdout, stderr, volume hosts, TES file:// URLs) must lie under:
    `[paths] roots` if set; else, without auth and without run-as (nobody vouches for who is
    asking, and the kernel does not check the paths with a user's rights), the task root; else
    None: anywhere the job's account may write."""
    if config.path_roots is not None:
        return config.path_roots
    if not config.auth_enabled and not config.run_as.get("enabled"):
        return (_resolved(str(config.task_root)),)
    return None


@functools.lru_cache(maxsize=16)
def _resolved(folder: str) -> str:
    """`folder` with its symbolic links resolved, once per process (not once per submit)."""
    return str(Path(folder).resolve())


def job_account(config: Config) -> tuple[str | None, bool]:
    """The one Unix account every job runs as when jobs do not run as their users, and whether the
    admin named it: `[run_as] account` if set; else `nobody` for a gateway running as root with
    auth off, unless `[run_as] allow_root_jobs`; else (None, False): the gateway's own account.
    A ConfigError for an account that cannot be used."""
    run_as = config.run_as
    if run_as.get("enabled"):
        return None, False
    named = run_as.get("account")
    if named is None and (os.geteuid() != 0 or config.auth_enabled or run_as.get("allow_root_jobs")):
        return None, False
    account, where = str(named or DEFAULT_ACCOUNT), f"{config.source}: $.run_as.account"
    try:
        entry = pwd.getpwnam(account)
    except KeyError:
        hint = "" if named else (" (a gateway running as root with auth off runs jobs as it: create it, or name "
                                 "another account there)")
        raise ConfigError(f"{where}: there is no Unix account named {account!r} on this machine{hint}") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"{where}: {account!r} is root; to run jobs as root, set [run_as] allow_root_jobs = true "
                          "instead")
    if entry.pw_uid == os.geteuid():
        return None, True  # the gateway's own account already
    if os.geteuid() != 0:
        raise ConfigError(f"{where}: running jobs as {account!r} needs the gateway to run as root")
    return account, named is not None


def can_reach(account: str, folder: Path) -> bool:
    """Whether `account` can pass through every folder down to `folder` and into it: asked of the
    kernel, by a short process running as that account (ACLs count)."""
    entry = pwd.getpwnam(account)
    probe = ["/bin/sh", "-c", 'test -d "$1" && test -x "$1"', "sh", str(folder)]
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    result = subprocess.run(probe, check=False, user=entry.pw_uid, group=entry.pw_gid, extra_groups=groups, cwd="/",
                            env={"PATH": "/usr/bin:/bin"}, capture_output=True, timeout=30)
    return result.returncode == 0


def check_reachable(account: str, folder: Path, source: str) -> None:
    """A ConfigError unless `account` can reach `folder` (`can_reach`), naming the closed folder."""
    if can_reach(account, folder):
        return
    closed = next((str(p) for p in [*reversed(folder.parents), folder]
                   if p.is_dir() and not os.stat(p).st_mode & stat.S_IXOTH), str(folder))
    raise ConfigError(
        f"{source}: jobs run as {account!r}, who cannot reach the task folders in {folder} ({closed} is closed to "
        f"it): set [gateway] state_dir (or task_root) to a folder every user may pass through, e.g. "
        f"/var/lib/jobproxy, or start the gateway from such a folder")


#: Where the embedded default keeps its task folders when their account cannot reach ./jobproxy-state.
FIRST_RUN_TASK_ROOT = Path("/var/lib/jobproxy/default-tasks")


def first_run_task_root(config: Config) -> Config:
    """The embedded default (no config file) started as root from a folder its jobs' account
    cannot pass through (e.g. a clone under /root): its task folders move to FIRST_RUN_TASK_ROOT,
    so that the first run just works, with a warning saying so. Anything else: `config` as it is."""
    account, _ = job_account(config)
    if account is None:
        return config
    above = Path(config.state_dir).resolve().parent
    while not above.exists():
        above = above.parent
    if can_reach(account, above):
        return config
    for folder in (*reversed(FIRST_RUN_TASK_ROOT.parents), FIRST_RUN_TASK_ROOT):
        if not folder.exists():
            folder.mkdir(mode=0o711)
            folder.chmod(0o711)
    log.warning("jobs run as %s, who cannot reach %s: task folders are in %s instead (set [gateway] state_dir "
                "in a config file to choose)", account, above, FIRST_RUN_TASK_ROOT)
    gateway = dataclasses.replace(config.sections.gateway, task_root=FIRST_RUN_TASK_ROOT)
    return dataclasses.replace(config, sections=dataclasses.replace(config.sections, gateway=gateway))


def check_limits(config: Config, task: Task) -> None:
    """Refuse a task that asks more than the site's per-task `[limits]`."""
    for field, limit in config.limits.items():
        asked = getattr(task, field)
        if asked is not None and asked > limit:
            raise _refuse(400, f"$.{field}", f"{asked} exceeds this site's limit of {limit} {UNITS[field]} per task")


def check_options(config: Config, task: Task) -> None:
    """Refuse scheduler options (v1 `options`) the site does not allow (`[tes] backend_parameters`,
    the one list for both APIs; TES requests were already sorted by it, see gateway.tes.request)."""
    allowed = config.sections.tes.backend_parameters
    for key in task.backend_parameters:
        if key not in allowed:
            shown = ", ".join(k for k in allowed if k not in ("cputime", "gpus")) or "none"
            raise _refuse(400, f"$.options.{key}", f"not allowed on this site (allowed: {shown})")


def check_run_as(config: Config, user: str) -> None:
    """The task's user must be a real, allowed Unix user: not root, not a system user, not denied."""
    try:
        entry = accounts.entry(user)  # the account database read again at most every accounts.TTL s
    except KeyError:
        raise _refuse(400, "$.user", f"there is no Unix user named {user!r} on this gateway") from None
    minimum = config.sections.run_as.min_uid
    if entry.pw_uid < minimum or user in config.sections.run_as.deny:
        raise _refuse(403, "$.user", f"tasks may not run as {user!r} on this site "
                      f"(root, system users below uid {minimum} and denied users are refused)")


def user_roots(roots: Iterable[str], user: str) -> list[str]:
    """The `[paths] roots` of `user` ({user} filled in), resolved."""
    return [os.path.realpath(root.replace("{user}", user)) for root in roots]


def check_paths(roots: Iterable[str], task: Task) -> None:
    """Output files and volume hosts must resolve (`..` and symlinks followed) under the user's roots."""
    places = [(where, path) for where, path in (("$.stdout", task.stdout), ("$.stderr", task.stderr))
              if not path.startswith(task.workdir + "/")]  # else the gateway's own default, in the task's folder
    if task.container:
        places += [(f"$.container.volumes[{i}].host", m.host) for i, m in enumerate(task.container.volumes)]
    if not places:
        return  # nothing to resolve: no realpath of the roots per submit
    allowed = user_roots(roots, task.user)
    shown = ", ".join(allowed) or "none"
    for where, path in places:
        if not path_within(path, allowed):
            raise _refuse(400, where, f"{path!r} is outside the folders this site allows for {task.user} ({shown})")
        real = os.path.realpath(path)
        if where in ("$.stdout", "$.stderr") and os.path.lexists(real) and not stat.S_ISREG(os.stat(real).st_mode):
            raise _refuse(400, where, f"{path!r} exists and is not a regular file")
