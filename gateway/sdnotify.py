"""systemd's readiness protocol (sd_notify), without a dependency: one datagram to $NOTIFY_SOCKET.

Under a unit with `Type=notify`, systemd passes the path of a Unix datagram socket in
`NOTIFY_SOCKET` (a leading `@` names Linux's abstract namespace) and waits for `READY=1` before it
counts the service as started; `STOPPING=1` says a stop has begun. Without the variable (not run
by systemd) nothing is sent.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `message` (e.g. "READY=1") to the service manager; whether it was sent. A failure is
    logged, never raised: the gateway serves all the same."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract socket; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("could not notify the service manager at %s: %s", address.lstrip("\0"), exc)
        return False
    return True
