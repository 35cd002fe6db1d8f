"""This machine's loopback ports and processes (the embedded store, the local cluster, the demo's server)."""

from __future__ import annotations

import os
import socket


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held together while picking, so they differ)."""
    socks = []
    try:
        for _ in range(n):
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
