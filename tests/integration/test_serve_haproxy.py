"""``ingress: haproxy``: Ray Serve's HAProxy in front of the replicas' own HTTP servers, every listener of it
on loopback (the ``mtorl-haproxy`` shim), with the same 4xx contract and zero-downtime updates as ``proxy``.

Its own module: Serve keeps the options of the first controller on a cluster, so this starts after the other
Serve modules have shut their application (and controller) down.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from mtorl.serving.schemas import RecommendResponse
from tests.integration.test_serve import (
    AUTH, TOKEN, TOKEN_ENV, _free_port, _get, _job, _post, _users, assert_poison_fails_alone,
    assert_serve_binds_loopback_only, assert_zero_downtime_update, listening_sockets,
)
from tests.integration.test_serve import test_bad_input_is_4xx_naming_the_field as assert_bad_input_is_4xx

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served_haproxy(ray_session: None, tiny_checkpoint: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ray import serve

    from mtorl.serving.app import run_serve
    from mtorl.training.checkpoint import load_checkpoint

    os.environ[TOKEN_ENV] = TOKEN
    port = _free_port()
    out = tmp_path_factory.mktemp("serve-haproxy") / "serve.yaml"
    res = run_serve(_job(tiny_checkpoint, port, ingress="haproxy"), config_out=str(out), blocking=False, progress=print)
    res.update(manifest=load_checkpoint(tiny_checkpoint).manifest, port=port, config_file=out)
    try:
        yield res
    finally:
        serve.shutdown()
        os.environ.pop(TOKEN_ENV, None)


def _haproxy_pids() -> set[int]:
    """PIDs of the HAProxy processes this Serve started (their command line names the shim's config dir)."""
    out = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"haproxy") and b"-f" in cmd:
            out.add(int(p))
    return out


def test_haproxy_answers_on_loopback_only(served_haproxy: dict[str, Any]) -> None:
    url, man, port = served_haproxy["url"], served_haproxy["manifest"], served_haproxy["port"]
    env = served_haproxy["serve_config"]["controller_options"]["runtime_env"]["env_vars"]
    cfg_dir = os.path.dirname(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"])
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("mtorl-haproxy")
    assert oct(os.stat(cfg_dir).st_mode & 0o777) == "0o700"  # it holds HAProxy's admin socket

    assert _get(f"{url}/healthz").json()["status"] == "ok"
    r = _post(f"{url}/v1/recommend", json={"users": _users(man, 3)}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert len(RecommendResponse.model_validate(r.json()).users) == 3

    # HAProxy itself: the frontend on 127.0.0.1:port, its stats and metrics rebound to loopback by the shim
    mine = [p for p in _haproxy_pids() if cfg_dir.encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert mine, "no HAProxy process of this Serve found"
    socks = listening_sockets(set(mine))
    side = (int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]))
    assert {p for _, p, _ in socks} >= {port, *side}, socks
    assert {a for a, _, _ in socks} == {"127.0.0.1"}, socks
    # and Serve's own processes (controller, HAProxy manager, replicas): loopback but Ray's own ports
    assert_serve_binds_loopback_only(port)


def test_haproxy_bad_input_is_4xx_naming_the_field(served_haproxy: dict[str, Any]) -> None:
    assert_bad_input_is_4xx(served_haproxy)
    assert_poison_fails_alone(f"{served_haproxy['url']}/v1/recommend", served_haproxy["manifest"], rounds=3)


def test_haproxy_zero_downtime_update(served_haproxy: dict[str, Any], tiny_dataset: str) -> None:
    assert_zero_downtime_update(served_haproxy, tiny_dataset, ingress="haproxy")
