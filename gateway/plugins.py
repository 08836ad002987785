"""Plugins, found through entry points: scheduler plugins in `jobproxy.schedulers`, container
runtimes in `jobproxy.containers`. The built-in ones are registered the same way as third-party
ones; the site config chooses one of each by name and gives its options."""
from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from schedulers.base import Scheduler, SchedulerConfigError
from schedulers.containers import ContainerRuntime, DockerRuntime

from . import policy
from .config import Config, ConfigError
from .validation import SchemaValidator, summary

SCHEDULERS = "jobproxy.schedulers"
CONTAINERS = "jobproxy.containers"


def installed(group: str) -> list[str]:
    return sorted(ep.name for ep in entry_points(group=group))


def plugin_class(group: str, name: str, base: type[Any], where: str) -> type[Any]:
    """The class registered as `name` in `group`; a ConfigError naming the installed ones if none."""
    found = {ep.name: ep for ep in entry_points(group=group)}
    if name not in found:
        raise ConfigError(f"{where}: no {group.rsplit('.', 1)[1][:-1]} plugin named {name!r} is installed "
                          f"(installed: {', '.join(installed(group)) or 'none'})")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{where}: the plugin {name!r} is not a {base.__name__}")
    return cls


def _checked_options(schema: dict[str, Any], options: Mapping[str, Any], where: str, source: str) -> dict[str, Any]:
    """`options` checked against the plugin's schema, with the schema's defaults filled in."""
    validator = SchemaValidator(schema)
    problems = validator.problems(dict(options))
    if problems:
        raise ConfigError(f"{source}: {summary(problems).replace('$', where, 1)}")
    return validator.with_defaults(dict(options))


def create_schedulers(config: Config) -> dict[str, Scheduler]:
    """Every configured scheduler instance, by name (`Config.instances`, in the file's order)."""
    return {name: create_scheduler(config, name) for name in config.instances}


def create_scheduler(config: Config, name: str | None = None) -> Scheduler:
    """Instantiate the scheduler instance `name` (None: the only one) and its container runtime,
    options checked against their own schemas; errors name the instance's table."""
    site, source = config.sections, config.source
    if name is None:
        if len(config.instances) != 1:
            raise ValueError(f"several scheduler instances ({', '.join(config.instances)}): name one")
        name = next(iter(config.instances))
    settings, table = config.instances[name], config.scheduler_table(name)
    kind = settings.type
    cls: type[Scheduler] = plugin_class(SCHEDULERS, kind, Scheduler, f"{source}: {table}.type")
    options = _checked_options(cls.options_schema, settings.options, f"{table}.options", source)
    if site.run_as.enabled and not cls.supports_run_as:
        raise ConfigError(f"{source}: $.run_as.enabled: the {kind} scheduler cannot run jobs as their users "
                          f"({table}); turn run_as off or choose another scheduler")
    runtime = None
    container = settings.container
    if container is not None:
        runtime_class: type[ContainerRuntime] = plugin_class(CONTAINERS, container["runtime"], ContainerRuntime,
                                                             f"{source}: {table}.container.runtime")
        runtime = runtime_class(_checked_options(runtime_class.options_schema, container,
                                                 f"{table}.container", source))
    account, named = policy.job_account(config)
    why = (f"$.run_as.account: jobs run as {account!r}" if named else
           f"$.run_as: a gateway running as root with auth off runs its jobs as {account!r}, never as root")
    if account is not None and not cls.supports_run_as:
        fix = ("remove [run_as] account, or choose another scheduler" if named else
               "turn auth on ([auth] enabled = true), set [run_as] allow_root_jobs = true to run jobs as root, "
               "or run the gateway as an unprivileged user")
        raise ConfigError(f"{source}: {why}, but the {kind} scheduler cannot run jobs as another account: {fix}")
    if account is not None and not named and isinstance(runtime, DockerRuntime):
        # an engine's socket is root's (or its group's); Singularity and Apptainer run as any user
        raise ConfigError(f"{source}: {why}, and {account!r} cannot use the container runtime "
                          f"({type(runtime).name}): name an account that may ([run_as] account = \"...\", "
                          "e.g. a member of the docker group), run jobs as their users ([run_as] enabled = true), "
                          "or set [run_as] allow_root_jobs = true")
    try:
        return cls(name, options, site.gateway.state_dir / "schedulers" / name,
                   runtime=runtime, run_as_user=site.run_as.enabled, account=account)
    except SchedulerConfigError as exc:
        raise ConfigError(f"{source}: scheduler {name!r}: {exc}") from None
