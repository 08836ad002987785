"""Routing: which scheduler instance a task goes to.

The site's `[[routes]]` (`config.RouteRule`) are read in order; the first rule whose conditions all
hold takes the task. The conditions:

- `users`: the task's user is one of them; `groups`: that user is in one of these Unix groups;
- `cores`, `memory` (MiB), `cputime` (CPU seconds), `gpus`: what the task asks for lies within
  the inclusive `{ min, max }`. A task that does not say counts as 1 core and 0 GPUs; without
  memory or CPU time it lies within every `max` and below every `min`;
- `images`: every container image the task names matches one of these shell-style patterns (a
  task without an image does not match);
- a task may ask for an instance by name (the v1 field `scheduler`, the TES backend parameter
  `scheduler`): then only rules to that instance can take it, and a rule with `requested = true`
  takes only tasks that asked for its instance.

A rule without conditions is the default. Without rules (one instance only: the config check
says so), every task goes to that instance. A task no rule takes is refused, naming why each rule
did not take it. Everything here is pure except `unix_groups`, asked only when a rule has `groups`.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import schemas
from schedulers import accounts
from schedulers.base import Task

from .config import Bounds, RouteRule

#: The numeric conditions, with the unit the config schema gives each (`x-unit`).
NUMBERS = ("cores", "memory", "cputime", "gpus")
UNITS = {name: schemas.load("config")["properties"]["routes"]["items"]["properties"][name]["x-unit"]
         for name in NUMBERS}
#: What a task that does not say asks for (None: nothing; within every max, below every min).
UNSAID: Mapping[str, int | None] = {"cores": 1, "memory": None, "cputime": None, "gpus": 0}

Groups = Callable[[str], frozenset[str]]


@dataclass(frozen=True)
class Request:
    """What routing reads of a task: who, how much, which images, and the instance it asked for."""

    user: str
    cores: int | None = None
    memory: int | None = None
    cputime: int | None = None
    gpus: int = 0
    images: tuple[str, ...] = ()
    requested: str | None = None

    @classmethod
    def of(cls, task: Task, requested: str | None = None, images: Iterable[str] | None = None) -> Request:
        """The request of `task`; `images` default to its container's image (TES: its executors')."""
        if images is None:
            images = (task.container.image,) if task.container is not None else ()
        return cls(task.user, task.cores, task.memory, task.cputime, task.gpus, tuple(images), requested)


@dataclass(frozen=True)
class Choice:
    """Where a task goes: the instance, the rule that took it (its index; None without rules)."""

    scheduler: str
    rule: int | None

    @property
    def label(self) -> str:
        """The rule as people count it: "1" for the first, "none" without rules."""
        return "none" if self.rule is None else str(self.rule + 1)


@dataclass(frozen=True)
class Mismatch:
    """Why a rule does not take a task: the JSON path of the task's field, and a sentence."""

    path: str
    message: str


class NoRoute(Exception):
    """No rule takes the task: `message` says why, `details` one path and message per rule."""

    def __init__(self, message: str, details: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.message, self.details = message, details


def unix_groups(user: str) -> frozenset[str]:
    """The names of the Unix groups `user` is in (none for a user without an account here), read
    again at most every `accounts.TTL` seconds."""
    return accounts.group_names(user)


def outside(name: str, bounds: Bounds, asked: int | None) -> Mismatch | None:
    """Why `asked` (of the condition `name`) is not within `bounds`; None when it is.

    >>> outside("cores", Bounds(min=4, max=None), 2).message
    'needs at least 4 cores; the task asks for 2'
    >>> outside("memory", Bounds(min=None, max=1024), None) is None
    True
    """
    value = asked if asked is not None else UNSAID[name]
    unit = UNITS[name]
    if bounds.min is not None and (value is None or value < bounds.min):
        said = "does not say" if value is None else f"asks for {value}"
        return Mismatch(f"$.{name}", f"needs at least {bounds.min} {unit}; the task {said}")
    if bounds.max is not None and value is not None and value > bounds.max:
        return Mismatch(f"$.{name}", f"takes at most {bounds.max} {unit}; the task asks for {value}")
    return None


def unmatched_image(patterns: Sequence[str], images: Sequence[str]) -> Mismatch | None:
    """Why `images` do not all match `patterns`; None when they do."""
    shown = ", ".join(patterns)
    if not images:
        return Mismatch("$.container.image", f"takes only tasks with an image matching {shown}; the task names none")
    for image in images:
        if not any(fnmatch.fnmatchcase(image, pattern) for pattern in patterns):
            return Mismatch("$.container.image", f"the image {image!r} matches none of {shown}")
    return None


def mismatch(rule: RouteRule, request: Request, groups: Groups = unix_groups) -> Mismatch | None:
    """Why `rule` does not take `request`; None when it does. Groups are looked up last."""
    if request.requested is not None and request.requested != rule.scheduler:
        return Mismatch("$.scheduler", f"the task asks for {request.requested!r}")
    if rule.requested and request.requested is None:
        return Mismatch("$.scheduler", f"takes only tasks that ask for {rule.scheduler!r} by name")
    if rule.users is not None and request.user not in rule.users:
        return Mismatch("$.user", f"the user {request.user!r} is not one of {', '.join(rule.users)}")
    for name in NUMBERS:
        bounds: Bounds | None = getattr(rule, name)
        miss = outside(name, bounds, getattr(request, name)) if bounds is not None else None
        if miss is not None:
            return miss
    if rule.images is not None:
        miss = unmatched_image(rule.images, request.images)
        if miss is not None:
            return miss
    if rule.groups is not None and not groups(request.user) & set(rule.groups):
        return Mismatch("$.user", f"the user {request.user!r} is in none of the groups {', '.join(rule.groups)}")
    return None


def describe(rule: RouteRule) -> str:
    """A rule's conditions in one line, e.g. `cores >= 8, users alice, bob -> hpc`."""
    parts = []
    if rule.requested:
        parts.append("asked for by name")
    for name in ("users", "groups", "images"):
        values = getattr(rule, name)
        if values is not None:
            parts.append(f"{name} {', '.join(values)}")
    for name in NUMBERS:
        bounds: Bounds | None = getattr(rule, name)
        if bounds is not None:
            low = f"{bounds.min} <= " if bounds.min is not None else ""
            high = f" <= {bounds.max}" if bounds.max is not None else ""
            parts.append(f"{low}{name}{high}" + ("" if name in ("cores", "gpus") else f" {UNITS[name]}"))
    return f"{'; '.join(parts) or 'any task'} -> {rule.scheduler}"


def choose(rules: Sequence[RouteRule], instances: Sequence[str], request: Request,
           groups: Groups = unix_groups) -> Choice:
    """The instance `request` goes to: the first rule that takes it (the only instance without
    rules). NoRoute, naming each rule's reason, when none does."""
    if request.requested is not None and request.requested not in instances:
        message = f"there is no scheduler {request.requested!r} here (configured: {', '.join(instances)})"
        raise NoRoute(f"$.scheduler: {message}", [{"path": "$.scheduler", "message": message}])
    if not rules:
        return Choice(instances[0], None)
    misses = []
    for index, rule in enumerate(rules):
        miss = mismatch(rule, request, groups)
        if miss is None:
            return Choice(rule.scheduler, index)
        if request.requested is None or rule.scheduler == request.requested:
            misses.append({"path": miss.path, "message": f"rule {index + 1} ({rule.scheduler}): {miss.message}"})
    if request.requested is not None:
        head = f"no routing rule lets this task ask for {request.requested!r}"
        if not misses:
            misses.append({"path": "$.scheduler", "message": f"no rule sends tasks to {request.requested!r}"})
    else:
        head = "no scheduler takes this task"
    reasons = "; ".join(f"{m['message']} ({m['path']})" for m in misses)
    raise NoRoute(f"{head}: {reasons}", misses)


def explain(rules: Sequence[RouteRule], instances: Sequence[str], request: Request,
            groups: Groups = unix_groups) -> list[str]:
    """Lines saying, rule by rule, whether each takes `request`, and where it goes (or why not)."""
    lines = []
    for index, rule in enumerate(rules):
        miss = mismatch(rule, request, groups)
        lines.append(f"rule {index + 1} ({describe(rule)}): " + ("takes it" if miss is None else
                                                                  f"no: {miss.path}: {miss.message}"))
        if miss is None:
            break
    try:
        choice = choose(rules, instances, request, groups)
    except NoRoute as exc:
        lines.append(f"refused (400): {exc.message}")
    else:
        lines.append(f"goes to {choice.scheduler}" + (" (the only scheduler instance)" if choice.rule is None
                                                      else f" (rule {choice.label})"))
    return lines


class Router:
    """The routing of one gateway: its rules and instances, and an observer of each choice (the
    metrics count them)."""

    def __init__(self, rules: Sequence[RouteRule], instances: Sequence[str], groups: Groups = unix_groups) -> None:
        self.rules, self.instances, self.groups = tuple(rules), tuple(instances), groups
        self.on_choice: Callable[[Choice], None] = _ignore

    def choose(self, request: Request) -> Choice:
        choice = choose(self.rules, self.instances, request, self.groups)
        self.on_choice(choice)
        return choice


def _ignore(_: Choice) -> None:
    """No observer."""
