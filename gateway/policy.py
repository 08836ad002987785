"""Site policy checked before a task is accepted: per-task limits, the Unix user a task runs as,
and the folders its output files and volumes may lie in. Each refusal names the field and the rule.
"""
from __future__ import annotations

import os
import pwd
import stat
from typing import Iterable

from .config import Config
from schedulers.base import Task, path_within
from .responses import ApiError

UNITS = {"cores": "cores", "memory": "MiB", "cputime": "CPU seconds"}


def _refuse(status: int, path: str, message: str) -> ApiError:
    return ApiError(status, f"{path}: {message}", [{"path": path, "message": message}])


def check(config: Config, task: Task) -> None:
    check_limits(config, task)
    if config.run_as.get("enabled"):
        check_run_as(config, task.user)
    if config.path_roots is not None:
        check_paths(config.path_roots, task)


def check_limits(config: Config, task: Task) -> None:
    """Refuse a task that asks more than the site's per-task `[limits]`."""
    for field, limit in config.limits.items():
        asked = getattr(task, field)
        if asked is not None and asked > limit:
            raise _refuse(400, f"$.{field}", f"{asked} exceeds this site's limit of {limit} {UNITS[field]} per task")


def check_run_as(config: Config, user: str) -> None:
    """The task's user must be a real, allowed Unix user: not root, not a system user, not denied."""
    try:
        entry = pwd.getpwnam(user)
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
    allowed = user_roots(roots, task.user)
    shown = ", ".join(allowed) or "none"
    places = [("$.stdout", task.stdout), ("$.stderr", task.stderr)]
    if task.container:
        places += [(f"$.container.volumes[{i}].host", m.host) for i, m in enumerate(task.container.volumes)]
    for where, path in places:
        if where in ("$.stdout", "$.stderr") and path.startswith(task.workdir + "/"):
            continue  # the gateway's own default, in the task's folder
        if not path_within(path, allowed):
            raise _refuse(400, where, f"{path!r} is outside the folders this site allows for {task.user} ({shown})")
        real = os.path.realpath(path)
        if where in ("$.stdout", "$.stderr") and os.path.lexists(real) and not stat.S_ISREG(os.stat(real).st_mode):
            raise _refuse(400, where, f"{path!r} exists and is not a regular file")
