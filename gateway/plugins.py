"""Scheduler plugins, found through the entry-point group `jobproxy.schedulers`."""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from schedulers.base import Scheduler, SchedulerError

from .config import Config, ConfigError
from .validation import SchemaValidator, summary

GROUP = "jobproxy.schedulers"


def installed() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def scheduler_class(name: str) -> type[Scheduler]:
    found = installed()
    if name not in found:
        names = ", ".join(sorted(found)) or "none"
        raise ConfigError(f"$.scheduler.type: no scheduler plugin named {name!r} is installed (installed: {names})")
    cls = found[name].load()  # type: ignore[attr-defined]
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise ConfigError(f"$.scheduler.type: the plugin {name!r} is not a jobproxy Scheduler")
    return cls


def create_scheduler(config: Config) -> Scheduler:
    """Instantiate the configured scheduler, its options checked against its own schema."""
    cls = scheduler_class(config.scheduler)
    problems = SchemaValidator(cls.options_schema).problems(config.scheduler_options)
    if problems:
        first = summary(problems).replace("$", "$.scheduler.options", 1)
        raise ConfigError(f"{config.source}: {first}")
    try:
        return cls(config.scheduler, config.scheduler_options, Path(config.state_dir) / "schedulers" / config.scheduler)
    except (SchedulerError, ValueError, OSError) as exc:
        raise ConfigError(f"{config.source}: scheduler {config.scheduler!r}: {exc}") from None
