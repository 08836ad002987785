"""Exec wrapper for local jobs: join cgroups, pin CPUs, set rlimits, then exec the job script.

Started by the local scheduler as `python -I launch.py [options] -- PROGRAM ARGS...` in a new
session. Doing this in a separate process rather than in `preexec_fn` keeps it safe in a threaded
gateway. It imports nothing but the standard library, so it runs from its file path alone.
"""
from __future__ import annotations

import argparse
import os
import resource


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="launch.py")
    parser.add_argument("--join", action="append", default=[], help="a cgroup.procs file to join")
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to pin to")
    parser.add_argument("--rlimit-as", type=int, default=0, help="address-space limit in bytes")
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        parser.error("no program to run")
    for procs in args.join:
        with open(procs, "w", encoding="ascii") as f:
            f.write(str(os.getpid()))
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    if args.rlimit_as:
        resource.setrlimit(resource.RLIMIT_AS, (args.rlimit_as, args.rlimit_as))
    os.execv(program[0], program)


if __name__ == "__main__":
    main()
