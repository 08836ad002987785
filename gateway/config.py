"""Site configuration: a TOML file validated against schemas/config.schema.json at start-up.

Every default is written once, in the schema (`default` keywords): the document is validated, the
schema's defaults are filled in (`SchemaValidator.with_defaults`), and the typed sections below are
built from the filled document. The sections have no defaults of their own, and no code downstream
repeats one: what a site leaves out is what the schema says.

Scheduler instances: `[schedulers.NAME]` tables, or the one `[scheduler]` table as an instance
named after its type (`Config.instances`); `[[routes]]` say which tasks go to which
(gateway/routing.py), checked here against the instances.

No file at all means the schema's defaults: the local scheduler, state in ./jobproxy-state,
listening on 127.0.0.1:8080. Relative paths in a file are taken relative to that file's folder;
`{state_dir}` in `[gateway] task_root` and `[store] path` stands for the state folder.

`Config` keeps the flat attributes (`config.page_size`, `config.run_as`, `config.tes`...) that the
rest of the gateway reads, each delegating to its section.
"""
from __future__ import annotations

import dataclasses
import functools
import grp
import ipaddress
import os
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .staging import reach
from .validation import SchemaValidator

#: The placeholder for the state folder in path settings (their defaults use it).
STATE_DIR = "{state_dir}"


class ConfigError(Exception):
    """A configuration mistake; the message names the file and the path of the mistake, one line
    per mistake when there are several."""


@dataclass(frozen=True)
class Https:
    """`[gateway.https]`: the TLS listener; file paths absolute."""

    port: int
    cert: str
    key: str
    client_ca: str | None


@dataclass(frozen=True)
class GatewaySettings:
    """`[gateway]`: where and how the gateway listens, and its state folders."""

    host: str
    port: int
    max_body_bytes: int
    state_dir: Path
    task_root: Path
    page_size: int
    max_page_size: int
    http: bool
    https: Https | None
    socket: Path | None
    umask: int
    allow_remote_without_auth: bool


@dataclass(frozen=True)
class StoreSettings:
    """`[store]`: the SQLite database, or a PostgreSQL one (`url`)."""

    path: Path
    idempotency_hours: float
    retain_days: float
    url: str | None  # PostgreSQL instead of SQLite (gateway.pgstore)
    password_file: Path | None


@dataclass(frozen=True)
class SchedulerSettings:
    """`[scheduler]`, or one `[schedulers.NAME]`: the plugin, how often it is polled, its options
    and its container runtime."""

    type: str
    poll_interval: float
    options: Mapping[str, Any]
    container: Mapping[str, Any] | None


@dataclass(frozen=True)
class Bounds:
    """The inclusive bounds of one `[[routes]]` condition on a number; None: unbounded that side."""

    min: int | None
    max: int | None


@dataclass(frozen=True)
class RouteRule:
    """One `[[routes]]` rule: a task meeting every condition it sets (None: no condition) goes to
    the instance `scheduler`; `requested`: only tasks that ask for that instance by name."""

    scheduler: str
    users: tuple[str, ...] | None
    groups: tuple[str, ...] | None
    images: tuple[str, ...] | None
    cores: Bounds | None
    memory: Bounds | None
    cputime: Bounds | None
    gpus: Bounds | None
    requested: bool


@dataclass(frozen=True)
class Token:
    """One `[auth] tokens` entry: only the SHA-256 hash of the token is configured."""

    user: str
    sha256: str
    admin: bool


@dataclass(frozen=True)
class AuthSettings:
    """`[auth]`: whether requests need a token, and the tokens."""

    enabled: bool
    tokens: tuple[Token, ...]


@dataclass(frozen=True)
class RunAsSettings:
    """`[run_as]`: which Unix account jobs run as (their tasks' users, or one account)."""

    enabled: bool
    min_uid: int
    deny: tuple[str, ...]
    account: str | None
    allow_root_jobs: bool


@dataclass(frozen=True)
class PathsSettings:
    """`[paths]`: the folders a task's files may lie in; None: no confinement."""

    roots: tuple[str, ...] | None


@dataclass(frozen=True)
class LimitsSettings:
    """`[limits]`: the most one task may ask for; None: no limit."""

    cores: int | None
    memory: int | None
    cputime: int | None
    gpus: int | None


@dataclass(frozen=True)
class QuotaSettings:
    """`[quotas]`: what one user may hold and ask; 0: no limit."""

    active_tasks: int
    requests_per_second: float
    burst: int


@dataclass(frozen=True)
class LogSettings:
    """`[log]`: the level of the gateway's log, and the audit log's format and file (None: stderr)."""

    level: str
    format: str
    audit: str
    audit_file: Path | None


@dataclass(frozen=True)
class MetricsSettings:
    """`[metrics]`: GET /metrics, and the SHA-256 of the token a scrape must send (None: public)."""

    enabled: bool
    token_sha256: str | None


@dataclass(frozen=True)
class StreamSettings:
    """`[streams]`: task output over HTTP and the event stream."""

    max_log_bytes: int
    follow_interval: float
    event_history: int
    heartbeat_seconds: float


@dataclass(frozen=True)
class ImageRule:
    """One `[tes] images` rule: a requested image matching `match` runs on the host (`run`) or as
    the local `image`."""

    match: str
    run: str | None
    image: str | None


@dataclass(frozen=True)
class TesSettings:
    """`[tes]`: how TES executors run and what TES clients may send."""

    images: tuple[ImageRule, ...]
    host_readable: tuple[str, ...]
    host_writable: tuple[str, ...]
    url_schemes: Mapping[str, Mapping[str, tuple[str, ...]]]
    backend_parameters: tuple[str, ...]
    log_tail_bytes: int
    service_info: Mapping[str, Any]


@dataclass(frozen=True)
class HttpStagingSettings:
    """`[staging.http]`: whether outputs may be sent with PUT; the hosts beyond the public ones
    that staging may reach (gateway/staging/reach.py)."""

    allow_put: bool
    allow_hosts: tuple[str, ...]


@dataclass(frozen=True)
class S3Settings:
    """`[staging.s3]`: the S3 service; None: from the standard AWS environment and files."""

    endpoint_url: str | None
    region: str | None
    access_key_id: str | None
    secret_access_key: str | None
    profile: str | None
    addressing_style: str
    part_bytes: int


@dataclass(frozen=True)
class StagingSettings:
    """`[staging]`: which URL schemes the gateway stages for TES tasks, and its limits."""

    schemes: tuple[str, ...]
    max_bytes: int
    timeout: float
    connect_timeout: float
    retries: int
    backoff: float
    parallel: int
    http: HttpStagingSettings
    s3: S3Settings


@dataclass(frozen=True)
class Sections:
    """The typed sections of one site configuration, one per table of the schema."""

    gateway: GatewaySettings
    store: StoreSettings
    scheduler: SchedulerSettings  # the single-instance form, filled with defaults even when unused
    schedulers: Mapping[str, SchedulerSettings]  # the named instances; empty: `scheduler` is the one
    routes: tuple[RouteRule, ...]  # read `Config.instances` for the instances either way
    auth: AuthSettings
    run_as: RunAsSettings
    paths: PathsSettings
    limits: LimitsSettings
    quotas: QuotaSettings
    log: LogSettings
    metrics: MetricsSettings
    tes: TesSettings
    staging: StagingSettings
    streams: StreamSettings


@dataclass(frozen=True)
class Config:
    """A validated site configuration: its typed `sections`, and where it came from."""

    sections: Sections
    source: str

    # ---- the flat names the rest of the gateway reads: each one delegates to its section ----

    @property
    def host(self) -> str:
        return self.sections.gateway.host

    @property
    def port(self) -> int:
        return self.sections.gateway.port

    @property
    def max_body_bytes(self) -> int:
        return self.sections.gateway.max_body_bytes

    @property
    def state_dir(self) -> Path:
        return self.sections.gateway.state_dir

    @property
    def task_root(self) -> Path:
        return self.sections.gateway.task_root

    @property
    def page_size(self) -> int:
        return self.sections.gateway.page_size

    @property
    def max_page_size(self) -> int:
        return self.sections.gateway.max_page_size

    @property
    def http(self) -> bool:
        return self.sections.gateway.http

    @functools.cached_property
    def https(self) -> dict[str, Any] | None:
        """`[gateway.https]` as a table (`client_ca` only when set), paths absolute."""
        https = self.sections.gateway.https
        if https is None:
            return None
        return {k: v for k, v in dataclasses.asdict(https).items() if v is not None}

    @property
    def socket(self) -> Path | None:
        return self.sections.gateway.socket

    @property
    def umask(self) -> int:
        return self.sections.gateway.umask

    @property
    def allow_remote_without_auth(self) -> bool:
        return self.sections.gateway.allow_remote_without_auth

    @property
    def store_path(self) -> Path:
        return self.sections.store.path

    @functools.cached_property
    def instances(self) -> Mapping[str, SchedulerSettings]:
        """The scheduler instances by name, in the file's order: the `[schedulers.NAME]` tables, or
        the one `[scheduler]` table as an instance named after its type."""
        named = self.sections.schedulers
        return dict(named) if named else {self.sections.scheduler.type: self.sections.scheduler}

    def scheduler_table(self, name: str) -> str:
        """The JSON path of instance `name`'s table: `$.schedulers.NAME`, or `$.scheduler`."""
        return f"$.schedulers.{name}" if self.sections.schedulers else "$.scheduler"

    @property
    def containers(self) -> bool:
        """Whether some scheduler instance has a container runtime."""
        return any(settings.container is not None for settings in self.instances.values())

    @property
    def auth_enabled(self) -> bool:
        return self.sections.auth.enabled

    @functools.cached_property
    def tokens(self) -> tuple[dict[str, Any], ...]:
        return tuple(dataclasses.asdict(token) for token in self.sections.auth.tokens)

    @functools.cached_property
    def run_as(self) -> dict[str, Any]:
        """`[run_as]` as a table, every key present."""
        run_as = self.sections.run_as
        return {"enabled": run_as.enabled, "min_uid": run_as.min_uid, "deny": list(run_as.deny),
                "account": run_as.account, "allow_root_jobs": run_as.allow_root_jobs}

    @property
    def path_roots(self) -> tuple[str, ...] | None:
        return self.sections.paths.roots

    @functools.cached_property
    def limits(self) -> dict[str, int]:
        """The limits that are set, by field name."""
        return {k: v for k, v in dataclasses.asdict(self.sections.limits).items() if v is not None}

    @property
    def log_level(self) -> str:
        return self.sections.log.level

    @property
    def log_format(self) -> str:
        return self.sections.log.format

    @functools.cached_property
    def tes(self) -> dict[str, Any]:
        """`[tes]` as a table, every key present (image rules with only the keys they set)."""
        tes = self.sections.tes
        return {
            "images": [{k: v for k, v in dataclasses.asdict(rule).items() if v is not None} for rule in tes.images],
            "host_readable": list(tes.host_readable),
            "host_writable": list(tes.host_writable),
            "url_schemes": {name: {d: list(argv) for d, argv in c.items()} for name, c in tes.url_schemes.items()},
            "backend_parameters": list(tes.backend_parameters),
            "log_tail_bytes": tes.log_tail_bytes,
            "service_info": dict(tes.service_info),
        }


def load(path: str | Path | None = None, **overrides: Any) -> Config:
    """Read and validate the config file (or the defaults), then apply `overrides` of `[gateway]`
    keys (e.g. host, port; None: not overridden)."""
    if path is None:
        document: dict[str, Any] = {}
        base, source = Path.cwd(), "built-in defaults"
    else:
        file = Path(path)
        try:
            document = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        base, source = file.resolve().parent, str(file)
    return from_document(document, base, source, **overrides)


def from_document(document: dict[str, Any], base: Path, source: str, **overrides: Any) -> Config:
    """The Config of a parsed TOML `document` whose relative paths are relative to `base`.

    `overrides` replace keys of `[gateway]` before validation (so they are checked like the file);
    a None override is ignored."""
    validator = SchemaValidator.named("config")
    document = _overridden(document, validator.schema, overrides)
    problems = validator.problems(document)
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem.path}: {problem.message}" for problem in problems))
    if "scheduler" in document and "schedulers" in document:
        raise ConfigError(f"{source}: $.scheduler: give either [scheduler] (one instance) or [schedulers.NAME] "
                          "tables, not both")
    filled = validator.with_defaults(document)
    config = Config(sections=sections(filled, base), source=source)
    _check(config)
    return config


def _overridden(document: dict[str, Any], schema: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    given = {key: value for key, value in overrides.items() if value is not None}
    known = schema["properties"]["gateway"]["properties"]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"not [gateway] settings: {', '.join(unknown)}")
    table = document.get("gateway")
    if not given or not isinstance(table, dict | None):
        return document  # nothing to override, or a [gateway] that is no table: the schema check says so
    return {**document, "gateway": {**(table or {}), **given}}


def sections(filled: Mapping[str, Any], base: Path) -> Sections:
    """The typed sections of a valid document with the schema's defaults filled in.

    Keys with a default are indexed (a missing one is a bug in the schema, not a silent default);
    keys the schema leaves unset read as None."""
    gateway, tes = filled["gateway"], filled["tes"]
    state_dir = base / gateway["state_dir"]
    https = gateway.get("https")
    return Sections(
        gateway=GatewaySettings(
            host=gateway["host"], port=gateway["port"], max_body_bytes=gateway["max_body_bytes"],
            state_dir=state_dir, task_root=_state_path(base, state_dir, gateway["task_root"]),
            page_size=gateway["page_size"], max_page_size=gateway["max_page_size"], http=gateway["http"],
            https=None if https is None else Https(
                port=https["port"], cert=str(base / https["cert"]), key=str(base / https["key"]),
                client_ca=str(base / https["client_ca"]) if "client_ca" in https else None),
            socket=base / gateway["socket"] if "socket" in gateway else None,
            umask=int(gateway["umask"], 8), allow_remote_without_auth=gateway["allow_remote_without_auth"]),
        store=StoreSettings(path=_state_path(base, state_dir, filled["store"]["path"]),
                            idempotency_hours=float(filled["store"]["idempotency_hours"]),
                            retain_days=float(filled["store"]["retain_days"]), url=filled["store"].get("url"),
                            password_file=base / filled["store"]["password_file"]
                            if "password_file" in filled["store"] else None),
        scheduler=_scheduler(filled["scheduler"]),
        schedulers={name: _scheduler(table) for name, table in (filled.get("schedulers") or {}).items()},
        routes=tuple(_rule(rule) for rule in filled["routes"]),
        auth=AuthSettings(enabled=filled["auth"]["enabled"], tokens=tuple(
            Token(user=t["user"], sha256=t["sha256"], admin=t["admin"]) for t in filled["auth"]["tokens"])),
        run_as=RunAsSettings(enabled=filled["run_as"]["enabled"], min_uid=filled["run_as"]["min_uid"],
                             deny=tuple(filled["run_as"]["deny"]), account=filled["run_as"].get("account"),
                             allow_root_jobs=filled["run_as"]["allow_root_jobs"]),
        paths=PathsSettings(roots=tuple(filled["paths"]["roots"]) if "roots" in filled["paths"] else None),
        limits=LimitsSettings(**{name: filled["limits"].get(name) for name in ("cores", "memory", "cputime", "gpus")}),
        quotas=QuotaSettings(active_tasks=filled["quotas"]["active_tasks"],
                             requests_per_second=float(filled["quotas"]["requests_per_second"]),
                             burst=filled["quotas"]["burst"]),
        log=LogSettings(level=filled["log"]["level"], format=filled["log"]["format"], audit=filled["log"]["audit"],
                        audit_file=base / filled["log"]["audit_file"] if "audit_file" in filled["log"] else None),
        metrics=MetricsSettings(enabled=filled["metrics"]["enabled"],
                                token_sha256=filled["metrics"].get("token_sha256")),
        tes=TesSettings(
            images=tuple(ImageRule(match=r["match"], run=r.get("run"), image=r.get("image")) for r in tes["images"]),
            host_readable=tuple(tes["host_readable"]), host_writable=tuple(tes["host_writable"]),
            url_schemes={name: {direction: tuple(argv) for direction, argv in commands.items()}
                         for name, commands in tes["url_schemes"].items()},
            backend_parameters=tuple(tes["backend_parameters"]), log_tail_bytes=tes["log_tail_bytes"],
            service_info=tes["service_info"]),
        staging=_staging(filled["staging"]),
        streams=StreamSettings(max_log_bytes=filled["streams"]["max_log_bytes"],
                               follow_interval=float(filled["streams"]["follow_interval"]),
                               event_history=filled["streams"]["event_history"],
                               heartbeat_seconds=float(filled["streams"]["heartbeat_seconds"])),
    )


def _scheduler(table: Mapping[str, Any]) -> SchedulerSettings:
    return SchedulerSettings(type=table["type"], poll_interval=float(table["poll_interval"]),
                             options=table["options"], container=table.get("container"))


def _rule(table: Mapping[str, Any]) -> RouteRule:
    def names(key: str) -> tuple[str, ...] | None:
        return tuple(table[key]) if key in table else None

    def bounds(key: str) -> Bounds | None:
        return Bounds(min=table[key].get("min"), max=table[key].get("max")) if key in table else None

    return RouteRule(scheduler=table["scheduler"], users=names("users"), groups=names("groups"),
                     images=names("images"), cores=bounds("cores"), memory=bounds("memory"),
                     cputime=bounds("cputime"), gpus=bounds("gpus"), requested=table["requested"])


def _staging(staging: Mapping[str, Any]) -> StagingSettings:
    s3 = staging["s3"]
    return StagingSettings(
        schemes=tuple(staging["schemes"]), max_bytes=staging["max_bytes"], timeout=float(staging["timeout"]),
        connect_timeout=float(staging["connect_timeout"]), retries=staging["retries"],
        backoff=float(staging["backoff"]), parallel=staging["parallel"],
        http=HttpStagingSettings(allow_put=staging["http"]["allow_put"],
                                 allow_hosts=tuple(staging["http"]["allow_hosts"])),
        s3=S3Settings(endpoint_url=s3.get("endpoint_url"), region=s3.get("region"),
                      access_key_id=s3.get("access_key_id"), secret_access_key=s3.get("secret_access_key"),
                      profile=s3.get("profile"), addressing_style=s3["addressing_style"], part_bytes=s3["part_bytes"]))


def _state_path(base: Path, state_dir: Path, value: str) -> Path:
    """A path setting, relative to `base`, with `{state_dir}` standing for the state folder."""
    return base / value.replace(STATE_DIR, str(state_dir))


def _check(config: Config) -> None:
    """What the schema cannot say: settings that contradict each other or this machine. Every
    problem is reported at once, one line each."""
    source, site = config.source, config.sections
    gateway = site.gateway
    problems: list[str] = []
    if not site.auth.enabled and not gateway.allow_remote_without_auth and not _loopback(gateway.host):
        problems.append(
            f"$.gateway.host: refusing to listen on {gateway.host} with auth off: anyone who reaches it could run "
            "commands. Turn auth on ([auth] enabled = true), listen on 127.0.0.1, or set "
            "[gateway] allow_remote_without_auth = true")
    if gateway.page_size > gateway.max_page_size:
        problems.append(f"$.gateway.page_size ({gateway.page_size}) exceeds max_page_size ({gateway.max_page_size})")
    if site.run_as.enabled and os.geteuid() != 0:
        problems.append("$.run_as.enabled: running jobs as their users needs the gateway to run as root")
    if not gateway.http and gateway.https is None and gateway.socket is None:
        problems.append("$.gateway: with http = false, [gateway.https] or socket must be configured")
    problems += _check_tes(site.tes, config.containers)
    problems += _check_routes(site.routes, list(config.instances))
    for index, entry in enumerate(site.staging.http.allow_hosts):
        try:
            reach.split([entry])
        except ValueError as exc:
            problems.append(f"$.staging.http.allow_hosts[{index}]: {exc}")
    s3 = site.staging.s3
    if (s3.access_key_id is None) != (s3.secret_access_key is None):
        problems.append("$.staging.s3: give both access_key_id and secret_access_key, or neither")
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))


def _check_routes(rules: tuple[RouteRule, ...], instances: list[str]) -> list[str]:
    """[[routes]]: each rule names a configured instance, bounds that can hold and groups that
    exist; several instances need rules. The problems found, each with its JSON path."""
    problems = []
    if not rules and len(instances) > 1:
        problems.append(f"$.routes: with several scheduler instances ({', '.join(instances)}), [[routes]] must say "
                        "which tasks go where")
    for index, rule in enumerate(rules):
        where = f"$.routes[{index}]"
        if rule.scheduler not in instances:
            problems.append(f"{where}.scheduler: scheduler {rule.scheduler!r} is not configured ([[routes]] rule "
                            f"{index + 1}; configured: {', '.join(instances)})")
        for name in ("cores", "memory", "cputime", "gpus"):
            bounds: Bounds | None = getattr(rule, name)
            if bounds is not None and bounds.min is not None and bounds.max is not None and bounds.min > bounds.max:
                problems.append(f"{where}.{name}: min ({bounds.min}) is more than max ({bounds.max}): "
                                "no task could match")
        for position, group in enumerate(rule.groups or ()):
            try:
                grp.getgrnam(group)
            except KeyError:
                problems.append(f"{where}.groups[{position}]: there is no Unix group named {group!r} on this machine")
    return problems


def _check_tes(tes: TesSettings, container: bool) -> list[str]:
    """[tes] images: each rule either runs on the host (bubblewrap must be installed) or names a
    local image (a container runtime must be configured). The problems found, each naming its rule."""
    problems = []
    for index, rule in enumerate(tes.images):
        where = f"$.tes.images[{index}]"
        if (rule.run is None) == (rule.image is None):
            problems.append(f"{where}: give exactly one of run = \"host\" or image = \"...\"")
        if rule.run is not None and shutil.which("bwrap") is None:
            problems.append(f"{where}: running images on the host needs bubblewrap (bwrap), which is not installed")
        if rule.image is not None and not container:
            problems.append(f"{where}: image rules need a container runtime ([scheduler.container], or the "
                            "container table of a [schedulers.NAME])")
    return problems


def _loopback(host: str) -> bool:
    """Whether `host` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
