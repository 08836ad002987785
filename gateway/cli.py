"""The `jobproxy` command: serve, check-config, token create."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys

from aiohttp import web

from schedulers.base import SchedulerError

from . import auth, retention
from . import config as configuration
from .app import create_app

log = logging.getLogger("jobproxy")


def tls_context(https: dict[str, str], source: str) -> ssl.SSLContext:
    """The server's TLS context; with `client_ca`, clients must present a certificate it signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(https["cert"], https["key"])
        if "client_ca" in https:
            context.load_verify_locations(https["client_ca"])
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise configuration.ConfigError(f"{source}: $.gateway.https: cannot load the certificate, key or CA: {exc}") from None
    return context


async def serve(app: web.Application, cfg: configuration.Config, context: ssl.SSLContext | None) -> None:
    """Serve HTTP and/or HTTPS side by side until SIGTERM or SIGINT."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sites = []
    if cfg.http:
        sites.append((web.TCPSite(runner, cfg.host, cfg.port), f"http://{cfg.host}:{cfg.port}/v1"))
    if cfg.https and context:
        port = int(cfg.https["port"])
        sites.append((web.TCPSite(runner, cfg.host, port, ssl_context=context), f"https://{cfg.host}:{port}/v1"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for site, url in sites:
            await site.start()
            print(f"JobProxy serving on {url}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobproxy", description="HTTP gateway in front of HPC batch schedulers")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the gateway")
    serve_cmd.add_argument("--config", help="site configuration (TOML); default: the embedded defaults")
    serve_cmd.add_argument("--host", help="address to listen on (overrides the config)")
    serve_cmd.add_argument("--port", type=int, help="HTTP port to listen on (overrides the config)")
    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config")
    token = commands.add_parser("token", help="manage API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="make a token; prints it once, with the line for the config")
    create.add_argument("--user", required=True, help="the user the token authenticates")
    create.add_argument("--admin", action="store_true", help="the token may see and submit for every user")
    purge = commands.add_parser("purge", help="forget finished tasks older than DAYS (records, folders, job files)")
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS", help="days since they finished")
    purge.add_argument("--config", help="site configuration (TOML); default: the embedded defaults")
    purge.add_argument("--dry-run", action="store_true", help="only list the tasks that would be removed")
    args = parser.parse_args(argv)

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
            print(f"{args.config}: OK (scheduler {cfg.scheduler})")
            return 0
        if args.command == "purge":
            return retention.command(configuration.load(args.config), args.older_than, args.dry_run)
        cfg = configuration.load(args.config, host=args.host, port=args.port)
        logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        os.umask(cfg.umask)
        context = tls_context(cfg.https, cfg.source) if cfg.https else None
        app = create_app(cfg)
    except configuration.ConfigError as exc:
        print(f"jobproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(app, cfg, context))
    except SchedulerError as exc:  # the scheduler's start() refused: say why, without a traceback
        print(f"jobproxy: scheduler {cfg.scheduler!r} could not start: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
