"""This machine's loopback ports and processes (the embedded store, the local cluster, the demo's server)."""

from __future__ import annotations

import os
import socket


# The lowest port free_ports picks: above Ray's client port (10001) and `ray start`'s default worker
# ports (10002-19999).
PICK_FROM = 20_000


def ephemeral_range() -> tuple[int, int] | None:
    """The kernel's ephemeral port range (the ports a ``bind(0)`` or an outgoing connection gets), or None
    where it can't be read (not Linux)."""
    try:
        lo, hi = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return lo, hi
    except (OSError, ValueError):
        return None


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held together while picking, so they differ), chosen at random below the
    kernel's ephemeral range where it leaves room: a port picked now is bound by its server only later,
    and in between every ``bind(0)`` on the machine (Ray starts dozens of processes that do) draws from
    the ephemeral range, so a port from there can be taken first ("Failed to bind to address"). Checked
    free on all interfaces (a server on 127.0.0.1 conflicts with one on 0.0.0.0); nothing listens."""
    import random

    rng = random.SystemRandom()
    eph = ephemeral_range()
    socks: list[socket.socket] = []
    try:
        if eph is not None and eph[0] - PICK_FROM >= 1_000:
            tries = 0
            while len(socks) < n and tries < 200 * n:
                tries += 1
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.bind(("", rng.randrange(PICK_FROM, eph[0])))
                except OSError:
                    s.close()
                    continue
                socks.append(s)
        while len(socks) < n:  # no room below the ephemeral range (or unlucky): let the kernel pick
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts); a zombie child of this process does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # not our child: it exists
        return True
