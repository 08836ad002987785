"""The `jobproxy` command."""
from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from . import config as configuration
from .app import create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobproxy", description="HTTP gateway in front of HPC batch schedulers")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="site configuration (TOML); default: the embedded defaults")
    serve.add_argument("--host", help="address to listen on (overrides the config)")
    serve.add_argument("--port", type=int, help="port to listen on (overrides the config)")
    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config")
    args = parser.parse_args(argv)

    try:
        if args.command == "check-config":
            cfg = configuration.load(args.config)
            create_app(cfg)
            print(f"{args.config}: OK (scheduler {cfg.scheduler})")
            return 0
        cfg = configuration.load(args.config, host=args.host, port=args.port)
        logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(cfg)
    except configuration.ConfigError as exc:
        print(f"jobproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    web.run_app(app, host=cfg.host, port=cfg.port, access_log=None,
                print=lambda _: print(f"JobProxy serving on http://{cfg.host}:{cfg.port}/v1", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
