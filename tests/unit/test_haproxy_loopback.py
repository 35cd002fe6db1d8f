"""The ``mtorl-haproxy`` shim: Ray Serve's own HAProxy config, rendered by Ray, with its stats and metrics
listeners rebound to loopback and nothing else changed; the result passes HAProxy's own config check."""

from __future__ import annotations

import subprocess
from pathlib import Path

from mtorl.serving.haproxy_loopback import config_path, loopback_side_binds, real_binary, rewrite_config


def _ray_config(tmp_path: Path, host: str) -> Path:
    """The config Ray Serve 2.60 writes before starting HAProxy (no backends yet), HTTP frontend on ``host``."""
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    cfg = HAProxyConfig(http_options=HTTPOptions(host=host, port=8123), socket_path=str(tmp_path / "admin.sock"),
                        server_state_base=str(tmp_path), server_state_file=str(tmp_path / "state"),
                        metrics_socket_path=str(tmp_path / "metrics.sock"), stats_port=8404, metrics_port=9101)
    api = HAProxyApi(cfg=cfg, config_file_path=str(tmp_path / "haproxy.cfg"))
    api._generate_config_file_internal()
    return tmp_path / "haproxy.cfg"


def _binds(text: str) -> list[str]:
    return [ln.split()[1] for ln in text.splitlines() if ln.strip().startswith("bind ")]


def test_side_listeners_go_to_loopback_the_frontend_stays(tmp_path: Path) -> None:
    path = _ray_config(tmp_path, "0.0.0.0")
    before = path.read_text()
    assert sorted(_binds(before)) == sorted(["*:8123", ":9101", "*:8404"]), _binds(before)  # Ray 2.60's template
    rewrite_config(str(path))
    after = path.read_text()
    assert sorted(_binds(after)) == sorted(["*:8123", "127.0.0.1:9101", "127.0.0.1:8404"])
    assert [a for a, b in zip(before.splitlines(), after.splitlines()) if a != b] == \
        [ln for ln in before.splitlines() if ln.strip() in ("bind :9101", "bind *:8404")]
    # HAProxy's own check of the rewritten file (-c: parse only, binds nothing)
    out = subprocess.run([real_binary(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    rewrite_config(str(path))
    assert path.read_text() == after  # idempotent: every reload runs it again


def test_loopback_frontend_and_other_forms(tmp_path: Path) -> None:
    path = _ray_config(tmp_path, "127.0.0.1")
    rewrite_config(str(path))
    assert set(_binds(path.read_text())) == {"127.0.0.1:8123", "127.0.0.1:9101", "127.0.0.1:8404"}
    text = ("listen stats\n  bind [::]:8404 ssl\nfrontend web\n    bind [::]:80\n"
            "frontend prometheus\n    bind 0.0.0.0:9\n")
    assert loopback_side_binds(text) == ("listen stats\n  bind 127.0.0.1:8404 ssl\nfrontend web\n    bind [::]:80\n"
                                         "frontend prometheus\n    bind 127.0.0.1:9\n")


def test_arguments() -> None:
    assert config_path(["-db", "-f", "/x/haproxy.cfg", "-dR", "-sf", "12", "-x", "/x/admin.sock"]) == "/x/haproxy.cfg"
    assert config_path(["-v"]) is None
