"""``ingress: direct``: the replica itself answers HTTP on the configured port (no proxy hop).

Its own module: Serve keeps the options of the first controller on a cluster, so this starts after
test_serve.py has shut its application (and controller) down.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from mtorl.serving.schemas import AllocateResponse, RecommendResponse
from tests.integration.test_serve import (
    AUTH, TOKEN, TOKEN_ENV, _bad_cases, _get, _job, _post, _users, assert_no_5xx_for_bad_bodies, assert_poison_fails_alone,
    assert_serve_binds_loopback_only, listening_sockets,
)

pytestmark = pytest.mark.integration


def _two_free_ports() -> int:
    """A port p with p and p + 1 both free (the replica takes p, Serve's idle proxy p + 1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = int(s.getsockname()[1])
        if p >= 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


def _listener_cmdline(port: int) -> str:
    """Command line of the process listening on ``port`` (Linux /proc)."""
    pids = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    for _, p, pid in listening_sockets(pids):
        if p == port:
            try:
                return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            except OSError:
                continue
    return ""


def test_direct_ingress_serves_from_the_replica(ray_session: None, tiny_checkpoint: str, tmp_path: Path) -> None:
    from ray import serve

    from mtorl.serving.app import run_serve
    from mtorl.training.checkpoint import load_checkpoint

    os.environ[TOKEN_ENV] = TOKEN
    port = _two_free_ports()
    out = tmp_path / "serve.yaml"
    try:
        res = run_serve(_job(tiny_checkpoint, port, ingress="direct"), config_out=str(out), blocking=False, progress=print)
        url, man = res["url"], load_checkpoint(tiny_checkpoint).manifest
        assert url == f"http://127.0.0.1:{port}"
        # the replica process holds the port itself; Serve's proxy sits idle on the next one
        assert "ServeReplica" in _listener_cmdline(port), _listener_cmdline(port)
        assert "ProxyActor" in _listener_cmdline(port + 1)

        assert _get(f"{url}/healthz").json()["status"] == "ok"
        assert _get(f"{url}/v1/model").status_code == 401
        r = _post(f"{url}/v1/recommend", json={"users": _users(man, 3)}, headers=AUTH)
        assert r.status_code == 200, r.text
        rec = RecommendResponse.model_validate(r.json())
        assert len(rec.users) == 3 and all(u.recommended_channel in man.channels for u in rec.users)
        a = _post(f"{url}/v1/allocate", json={"users": _users(man, 6), "budget": 3.0}, headers=AUTH)
        assert a.status_code == 200 and AllocateResponse.model_validate(a.json()).spend <= 3.0 + 1e-9, a.text
        for name, body, status, field in _bad_cases(man):  # same 4xx contract as through the proxy
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            b = _post(f"{url}/v1/recommend", content=content, headers={**AUTH, "Content-Type": "application/json"})
            assert b.status_code == status and b.json()["detail"].startswith(field + ":"), (name, b.text[:300])

        assert_no_5xx_for_bad_bodies(f"{url}/v1/recommend", man)
        assert_poison_fails_alone(f"{url}/v1/recommend", man, rounds=4)
        assert_serve_binds_loopback_only(port)

        cfg = out.read_text()
        assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" in cfg and f"port: {port + 1}" in cfg
    finally:
        serve.shutdown()
        os.environ.pop(TOKEN_ENV, None)


def test_direct_ingress_is_one_replica() -> None:
    from mtorl.spec import SpecError, make_job

    with pytest.raises(SpecError, match="max_replicas"):
        make_job("ServeJob", "x", {"checkpoint": "s3://b/r", "ingress": "direct", "autoscaling": {"max_replicas": 3}})
