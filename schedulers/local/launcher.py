"""Exec wrapper for local jobs: join cgroups, pin CPUs, set rlimits, become the task's user, open
the output files, then exec the job script.

Started by the local scheduler as `python -I launch.py [options] --script JOB.sh` in a new session.
Doing this in a separate process rather than in `preexec_fn` keeps it safe in a threaded gateway.
The script is read before privileges are dropped (it lives in the gateway's private spool), copied
into a memory file the job's user owns and run as `/bin/bash /dev/fd/N`; the output files are
opened after, so the kernel checks them with the task user's rights. It imports nothing but the standard library, so it runs from its path.
"""
from __future__ import annotations

import argparse
import os
import pwd
import resource
import sys

SCRIPT_FD = 3


def _become(user: str) -> None:
    entry = pwd.getpwnam(user)
    os.initgroups(entry.pw_name, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="launch.py")
    parser.add_argument("--join", action="append", default=[], help="a cgroup.procs file to join")
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to pin to")
    parser.add_argument("--rlimit-as", type=int, default=0, help="address-space limit in bytes")
    parser.add_argument("--user", help="run as this Unix user (the launcher must be root)")
    parser.add_argument("--stdout", required=True)
    parser.add_argument("--stderr", required=True)
    parser.add_argument("--script", required=True, help="the job script, run by /bin/bash")
    args = parser.parse_args(argv)
    try:
        for procs in args.join:
            with open(procs, "w", encoding="ascii") as f:
                f.write(str(os.getpid()))
        if args.cpus:
            os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
        if args.rlimit_as:
            resource.setrlimit(resource.RLIMIT_AS, (args.rlimit_as, args.rlimit_as))
        with open(args.script, "rb") as f:
            script_text = f.read()
        if args.user:
            _become(args.user)
        script = os.memfd_create("jobproxy-job")  # created after dropping privileges: the job may read it
        os.write(script, script_text)
        os.lseek(script, 0, os.SEEK_SET)
        for path, target in ((args.stdout, 1), (args.stderr, 2)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
            os.dup2(fd, target)
            os.close(fd)
        os.dup2(script, SCRIPT_FD)
        os.set_inheritable(SCRIPT_FD, True)
        os.execv("/bin/bash", ["/bin/bash", f"/dev/fd/{SCRIPT_FD}"])
    except (OSError, KeyError) as exc:
        print(f"jobproxy launcher: cannot start the job: {exc}", file=sys.stderr)
        sys.exit(255)


if __name__ == "__main__":
    main()
