"""Refuses every connection and name lookup that would leave this machine's loopback.

Loaded by every Python process the tests start (tests/conftest.py puts this folder first on
PYTHONPATH, so Python imports it at start-up) and by the test process itself. A refused attempt
is appended to $JAXRM_NETGUARD_LOG; the suite fails at its end if that file names any.
"""

import os
import sys

LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback", "::1", ""}


def is_loopback(host: object) -> bool:
    if host is None:  # getaddrinfo(None, port): a local wildcard address
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").lower()
    return host in LOOPBACK_NAMES or host.startswith(("127.", "::ffff:127."))


def _refuse(event: str, target: object) -> None:
    log = os.environ.get("JAXRM_NETGUARD_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"pid {os.getpid()}: {event} {target!r} ({' '.join(sys.argv)[:200]})\n")
    raise ConnectionRefusedError(f"test network guard: {event} to {target!r} leaves 127.0.0.1")


def _audit(event: str, args: tuple) -> None:
    if event == "socket.getaddrinfo" and not is_loopback(args[0]):
        _refuse(event, args[0])
    elif event in ("socket.connect", "socket.sendto"):
        address = args[1] if event == "socket.connect" else args[-1]
        if isinstance(address, tuple) and not is_loopback(address[0]):
            _refuse(event, address)


sys.addaudithook(_audit)
