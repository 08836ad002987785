"""The `jobproxy` command: serve, check-config, token create, purge; and the client subcommands
(submit, state, wait, logs, cancel, delete) of `gateway.cli_client`."""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import socket
import ssl
import stat
import sys
from pathlib import Path

from aiohttp import web

import schemas
from schedulers.base import SchedulerError

from . import auth, cli_client, logs, policy, reload, retention, routing, sdnotify
from . import config as configuration
from .app import SchedulerStartError, create_app
from .codec import DecodeError, decode
from .model import task_from_document
from .validation import SchemaValidator

log = logging.getLogger("jobproxy")


class StartupError(Exception):
    """The gateway cannot start for a reason of this machine (a port in use, say); the message is
    one line naming the problem and the setting behind it."""


def _reason(exc: OSError) -> str:
    """What went wrong, in lower case and without the errno: "address already in use"."""
    text = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


async def _start(site: web.BaseSite, url: str, setting: str) -> None:
    """Start listening on one site; an OSError (port in use, a port < 1024 without the right, an
    unknown host) becomes a StartupError naming `setting`."""
    try:
        await site.start()
    except OSError as exc:
        where = url.split("://", 1)[-1].removesuffix("/v1")
        raise StartupError(f"cannot listen on {where} ({setting}): {_reason(exc)}") from None


def tls_context(https: dict[str, str], source: str) -> ssl.SSLContext:
    """The server's TLS context; with `client_ca`, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(https["cert"], https["key"])
        if "client_ca" in https:
            context.load_verify_locations(https["client_ca"])
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise configuration.ConfigError(f"{source}: $.gateway.https: cannot load the certificate, key or CA: "
                                        f"{exc}") from None
    return context


def unix_socket(path: Path, source: str) -> socket.socket:
    """A listening Unix socket at `path`, mode 0666 (anyone may connect: the kernel tells the
    gateway who each caller is), in a folder created for it if missing (mode 0755). A stale socket
    file, one no process listens on any more, is replaced; anything else at `path` stops the start."""
    where = f"{source}: $.gateway.socket"
    folder = path.parent
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for created in missing:
            created.chmod(0o755)
        if stat.S_IMODE(folder.stat().st_mode) & 0o002 and not folder.stat().st_mode & stat.S_ISVTX:
            raise configuration.ConfigError(f"{where}: {folder} is writable by everyone (and not sticky): "
                                            "anyone could replace the socket; choose a folder of the gateway's own")
        if path.is_symlink() or (path.exists() and not path.is_socket()):
            raise configuration.ConfigError(f"{where}: {path} exists and is not a socket; remove it or choose "
                                            "another path")
        if path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                except (ConnectionRefusedError, FileNotFoundError):
                    path.unlink(missing_ok=True)  # stale: nobody listens on it any more
                else:
                    raise configuration.ConfigError(f"{where}: another process is listening on {path}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o111)  # the socket file is created 0666: no chmod by path afterwards
        try:
            listener.bind(str(path))
        finally:
            os.umask(previous)
    except OSError as exc:
        raise configuration.ConfigError(f"{where}: cannot listen on {path}: {exc.strerror}") from None
    listener.listen(128)
    listener.setblocking(False)
    closed = [str(p) for p in (folder, *folder.parents) if not p.stat().st_mode & stat.S_IXOTH]
    if closed:
        log.warning("other users cannot reach the socket %s: %s closed to them (mode o-x)", path, ", ".join(closed))
    return listener


async def serve(app: web.Application, cfg: configuration.Config, context: ssl.SSLContext | None) -> None:
    """Serve HTTP and/or HTTPS and/or the Unix socket side by side until SIGTERM or SIGINT. The
    socket is taken first, so a second gateway on the same socket stops before it touches anything."""
    listener = unix_socket(Path(cfg.socket), cfg.source) if cfg.socket is not None else None
    runner = web.AppRunner(app, access_log=None)
    try:
        await runner.setup()
        try:
            sites: list[tuple[web.BaseSite, str, str]] = []
            if cfg.http:
                sites.append((web.TCPSite(runner, cfg.host, cfg.port), f"http://{cfg.host}:{cfg.port}/v1",
                              "[gateway] host/port, or --host/--port"))
            if cfg.https and context:
                port = int(cfg.https["port"])
                sites.append((web.TCPSite(runner, cfg.host, port, ssl_context=context),
                              f"https://{cfg.host}:{port}/v1", "[gateway] host, [gateway.https] port"))
            if listener is not None:
                sites.append((web.SockSite(runner, listener), f"unix:{cfg.socket} (base path /v1)",
                              "[gateway] socket, or --socket"))
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, reload.on_sighup, app)  # re-read the config: gateway/reload.py
            for site, url, setting in sites:
                await _start(site, url, setting)
                print(f"JobProxy serving on {url}", flush=True)
            sdnotify.notify("READY=1\nSTATUS=serving " + ", ".join(url for _, url, _ in sites))
            await stop.wait()
            sdnotify.notify("STOPPING=1")
        finally:
            await runner.cleanup()
    finally:
        if listener is not None:  # the socket file is this gateway's: leave no stale one behind
            listener.close()
            Path(cfg.socket or "").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobproxy", description="HTTP gateway in front of HPC batch schedulers")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the gateway")
    serve_cmd.add_argument("--config", help="site configuration (TOML); default: the embedded defaults")
    serve_cmd.add_argument("--host", help="address to listen on (overrides the config)")
    serve_cmd.add_argument("--port", type=int, help="HTTP port to listen on (overrides the config)")
    serve_cmd.add_argument("--socket", help="also listen on this Unix socket; callers are identified by the kernel")
    check = commands.add_parser("check-config", help="validate a configuration file, print its scheduler "
                                                     "instances and routing rules, and exit")
    check.add_argument("config")
    check.add_argument("--explain", metavar="TASK", help="a v1 task (JSON or XML file): say which scheduler "
                                                         "instance it would go to, and why")
    token = commands.add_parser("token", help="manage API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="make a token; prints it once, with the line for the config")
    create.add_argument("--user", required=True, help="the user the token authenticates")
    create.add_argument("--admin", action="store_true", help="the token may see and submit for every user")
    purge = commands.add_parser("purge", help="forget finished tasks older than DAYS (records, folders, job files)")
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS", help="days since they finished")
    purge.add_argument("--config", help="site configuration (TOML); default: the embedded defaults")
    purge.add_argument("--dry-run", action="store_true", help="only list the tasks that would be removed")
    cli_client.register(parser, commands)
    args = parser.parse_args(argv)
    if hasattr(args, "run"):
        return cli_client.run(args)

    if args.command == "token":
        secret = auth.new_token()
        print(f"token (shown once; give it to {args.user}): {secret}")
        print("add to the [auth] section of the site config:")
        admin = ", admin = true" if args.admin else ""
        print(f'tokens = [ {{ user = "{args.user}", sha256 = "{auth.hash_token(secret)}"{admin} }} ]')
        return 0
    try:
        if args.command == "check-config":
            cfg = configuration.load(args.config)
            create_app(cfg)
            if cfg.https:
                tls_context(cfg.https, cfg.source)
            print(f"{args.config}: OK (scheduler {', '.join(cfg.instances)})")
            _print_routes(cfg)
            return _explain(cfg, args.explain) if args.explain else 0
        if args.command == "purge":
            return retention.command(configuration.load(args.config), args.older_than, args.dry_run)
        socket_path = str(Path(args.socket).absolute()) if args.socket else None  # the schema checks strings
        cfg = configuration.load(args.config, host=args.host, port=args.port, socket=socket_path)
        logs.configure(cfg.log_level, cfg.log_format)
        if args.config is None:  # the embedded default must just work, also as root from under /root
            cfg = policy.first_run_task_root(cfg)
        os.umask(cfg.umask)
        context = tls_context(cfg.https, cfg.source) if cfg.https else None
        app = create_app(cfg)
        if args.config is not None:  # SIGHUP reads the file again, with the same command-line overrides
            app[reload.LIVE].loader = functools.partial(configuration.load, args.config, host=args.host, port=args.port,
                                                        socket=socket_path)
    except configuration.ConfigError as exc:
        _configuration_error(exc)
        return 2
    try:
        asyncio.run(serve(app, cfg, context))
    except configuration.ConfigError as exc:  # found at start-up: the state folders, the store, the socket
        _configuration_error(exc)
        return 2
    except StartupError as exc:  # a listener could not start
        print(f"jobproxy: {exc}", file=sys.stderr)
        return 1
    except SchedulerError as exc:  # a scheduler's start() refused: say why, without a traceback
        reason = " ".join(str(exc).split())
        name = exc.name if isinstance(exc, SchedulerStartError) else ", ".join(cfg.instances)
        print(f"jobproxy: scheduler {name!r} could not start: {reason}", file=sys.stderr)
        return 3
    return 0


def _print_routes(cfg: configuration.Config) -> None:
    """The scheduler instances, and the routing rules in the order they are tried."""
    for name, settings in cfg.instances.items():
        print(f"scheduler {name}: type {settings.type}, polled every {settings.poll_interval:g} s"
              + (f", containers by {settings.container['runtime']}" if settings.container else ""))
    if not cfg.sections.routes:
        print(f"routes: none; every task goes to {next(iter(cfg.instances))}")
    for index, rule in enumerate(cfg.sections.routes):
        print(f"route {index + 1}: {routing.describe(rule)}")


def _explain(cfg: configuration.Config, path: str) -> int:
    """`check-config --explain TASK`: where the v1 task in the file `path` would go, rule by rule;
    exit status 0 if some instance takes it, 1 if it would be refused, 2 if it is not a valid task."""
    try:
        body = Path(path).read_bytes()
        kind = "application/xml" if body.lstrip().startswith(b"<") else "application/json"
        document, _ = decode(body, kind, schemas.load("task"))
    except (OSError, DecodeError) as exc:
        print(f"jobproxy: {path}: cannot read the task: {exc}", file=sys.stderr)
        return 2
    problems = SchemaValidator.named("task").problems(document)
    if problems:
        for problem in problems:
            print(f"jobproxy: {path}: {problem.path}: {problem.message}", file=sys.stderr)
        return 2
    task = task_from_document(document, "explain", "/explain")
    request = routing.Request.of(task, document.get("scheduler"))
    print(f"task {path}: {json.dumps(document, sort_keys=True)[:200]}")
    lines = routing.explain(cfg.sections.routes, list(cfg.instances), request)
    for line in lines:
        print(line)
    return 1 if lines[-1].startswith("refused") else 0


def _configuration_error(exc: configuration.ConfigError) -> None:
    """Print a configuration error, one line per problem."""
    for line in str(exc).splitlines() or [""]:
        print(f"jobproxy: configuration error: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
