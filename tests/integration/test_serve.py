"""The Serve application end to end: a checkpoint trained here, real HTTP on loopback, a live update."""

from __future__ import annotations

import asyncio
import json
import math
import functools
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from mtorl.serving.schemas import AllocateResponse, RecommendResponse
from mtorl.spec import SpecError, make_job

pytestmark = pytest.mark.integration

TOKEN_ENV = "MTORL_TEST_SERVE_TOKEN"
TOKEN = "test-token-7f3a9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {"max_journey_length": 40, "max_users_per_request": 50, "max_body_bytes": 64_000, "request_timeout_s": 120}
# Generous client timeouts: on a loaded 2-core CI machine a first request can take seconds.
_get = functools.partial(httpx.get, timeout=120)
_post = functools.partial(httpx.post, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job(checkpoint: str, port: int, **extra: Any) -> Any:
    return make_job("ServeJob", "serve-test", {"checkpoint": checkpoint, "port": port, "auth_token_env": TOKEN_ENV,
                                               "max_batch_size": 8, "batch_wait_timeout_s": 0.01, **LIMITS, **extra})


@pytest.fixture(scope="module")
def served(ray_session: None, tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ray import serve

    from mtorl.serving.app import run_serve
    from mtorl.training.checkpoint import load_checkpoint

    os.environ[TOKEN_ENV] = TOKEN
    port = _free_port()
    out = tmp_path_factory.mktemp("serve") / "serve.yaml"
    res = run_serve(_job(tiny_checkpoint, port), config_out=str(out), blocking=False, progress=print)
    res["manifest"] = load_checkpoint(tiny_checkpoint).manifest
    res["port"] = port
    try:
        yield res
    finally:
        serve.shutdown()
        os.environ.pop(TOKEN_ENV, None)


def _users(man: dict[str, Any], n: int, steps: int = 4, start: int = 0) -> list[dict[str, Any]]:
    chans = man["channels"]
    return [{"user_id": f"u{start + i}",
             "journey": [{"channel": chans[(i + t) % len(chans)], "gain": float((i * t) % 2), "cost": 1.0 + (i + t) % 3,
                          "features": {f: float((3 * t + i) % 24) for f in man["step_features"]}} for t in range(steps)],
             "user_features": {f: 0.1 * (i % 7) - 0.3 for f in man["user_features"]}} for i in range(n)]


def test_health_docs_and_model(served: dict[str, Any]) -> None:
    url, man = served["url"], served["manifest"]
    assert url == f"http://127.0.0.1:{served['port']}"
    assert _get(f"{url}/healthz").json()["status"] == "ok"
    assert "swagger" in _get(f"{url}/docs").text.lower()
    spec = _get(f"{url}/openapi.json").json()
    assert {"/v1/recommend", "/v1/allocate", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert "RecommendRequest" in spec["components"]["schemas"] and "StepIn" in spec["components"]["schemas"]
    m = _get(f"{url}/v1/model", headers=AUTH).json()
    assert m["checkpoint"] == served["checkpoint"] and m["model_version"] == served["model_version"]
    assert m["data"]["channels"] == man["channels"] and m["data"]["step_features"] == man["step_features"]
    assert m["data"]["splits"]["train"]["users"] > 0 and m["spec"]["kind"] == "TrainJob"
    assert m["serving"]["max_journey_length"] == LIMITS["max_journey_length"]


def test_auth(served: dict[str, Any]) -> None:
    url = served["url"]
    body = {"users": _users(served["manifest"], 1)}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Bearer"}):
        r = _post(f"{url}/v1/recommend", json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert TOKEN not in r.text
    assert _get(f"{url}/v1/model").status_code == 401
    assert _post(f"{url}/v1/recommend", json=body, headers=AUTH).status_code == 200


def test_recommend(served: dict[str, Any]) -> None:
    man = served["manifest"]
    r = _post(f"{served['url']}/v1/recommend", json={"users": _users(man, 3)}, headers=AUTH)
    assert r.status_code == 200, r.text
    out = r.json()
    RecommendResponse.model_validate(out)  # the documented response model, field for field
    assert out["model_version"] == served["model_version"] and [u["user_id"] for u in out["users"]] == ["u0", "u1", "u2"]
    for u in out["users"]:
        assert set(u["channel_probs"]) == set(man["channels"]) == set(u["predicted_reward"])
        assert sum(u["channel_probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert u["recommended_channel"] in man["channels"]
        assert u["expected_reward"] == pytest.approx(u["predicted_reward"][u["recommended_channel"]])
        assert all(math.isfinite(v) for v in u["predicted_reward"].values())


def test_allocate_spend_within_budget(served: dict[str, Any]) -> None:
    users = _users(served["manifest"], 30)
    for budget in (0.0, 4.0, 11.5, 1e6):
        r = _post(f"{served['url']}/v1/allocate", json={"users": users, "budget": budget, "penalty": 0.01}, headers=AUTH)
        assert r.status_code == 200, r.text
        out = r.json()
        AllocateResponse.model_validate(out)
        assert out["spend"] <= budget + 1e-9
        assert out["spend"] == pytest.approx(sum(s["cost"] for s in out["selected"]))
        assert out["total_expected_reward"] == pytest.approx(sum(s["expected_reward"] for s in out["selected"]))
        assert out["n_users"] == 30 and len({s["user_id"] for s in out["selected"]}) == len(out["selected"])
    assert out["selected"], "a huge budget selects every user with a positive value"


def _bad_cases(man: dict[str, Any]) -> list[tuple[str, Any, int, str]]:
    """(name, body (dict, or raw bytes), status, field the detail must start with)."""
    def body(mut: Any) -> dict[str, Any]:
        b = {"users": _users(man, 2)}
        mut(b)
        return b

    feat = man["step_features"][0]
    nan_body = json.dumps({"users": _users(man, 1)}).replace(f'"{feat}": 0.0', f'"{feat}": NaN', 1).encode()
    assert b"NaN" in nan_body
    return [
        ("unknown channel", body(lambda b: b["users"][1]["journey"][2].update(channel="tv")), 422, "users[1].journey[2].channel"),
        ("unknown feature", body(lambda b: b["users"][0]["journey"][3]["features"].update(foo=1.0)), 422, "users[0].journey[3].features.foo"),
        ("missing feature", body(lambda b: b["users"][0]["journey"][0].update(features={})), 422, "users[0].journey[0].features"),
        ("unknown user feature", body(lambda b: b["users"][0]["user_features"].update(bar=1.0)), 422, "users[0].user_features.bar"),
        ("NaN", nan_body, 422, "users[0].journey[0].features." + feat),
        ("empty journey", body(lambda b: b["users"][0].update(journey=[])), 422, "users[0].journey"),
        ("journey too long", body(lambda b: b["users"][0].update(journey=_users(man, 1, steps=41)[0]["journey"])), 422, "users[0].journey"),
        ("too many users", {"users": _users(man, 51, steps=1)}, 422, "users"),
        ("no users", {"users": []}, 422, "users"),
        ("negative cost", body(lambda b: b["users"][0]["journey"][0].update(cost=-2.0)), 422, "users[0].journey[0].cost"),
        ("not JSON", b"{users: [", 400, "body"),
        ("wrong type", {"users": "all"}, 422, "users"),
        ("oversized body", {"users": _users(man, 45, steps=40)}, 413, "body"),
    ]


def test_bad_input_is_4xx_naming_the_field(served: dict[str, Any]) -> None:
    url = f"{served['url']}/v1/recommend"
    for name, body, status, field in _bad_cases(served["manifest"]):
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = _post(url, content=content, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert r.json()["detail"].startswith(field + ":"), (name, r.json()["detail"])
    # a chunked body (no Content-Length) over the limit is refused too
    big = json.dumps({"users": _users(served["manifest"], 45, steps=40)}).encode()
    r = _post(url, content=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]), headers=AUTH)
    assert r.status_code == 413, r.text[:300]
    # allocate: the budget is required and finite
    r = _post(f"{served['url']}/v1/allocate", json={"users": _users(served["manifest"], 1)}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"].startswith("budget:")


def test_concurrent_requests_are_batched(served: dict[str, Any]) -> None:
    man = served["manifest"]

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=30) as c:
            return await asyncio.gather(*[c.post(f"{served['url']}/v1/recommend", json={"users": _users(man, 2, start=10 * i)})
                                          for i in range(24)])

    before = _get(f"{served['url']}/v1/model", headers=AUTH).json()["stats"]
    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    assert [r.json()["users"][0]["user_id"] for r in rs] == [f"u{10 * i}" for i in range(24)]
    after = _get(f"{served['url']}/v1/model", headers=AUTH).json()["stats"]
    assert after["requests"] - before["requests"] == 24
    assert after["batches"] - before["batches"] < 24  # several requests shared a forward pass


def test_serve_config_and_typed_builder(served: dict[str, Any]) -> None:
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from mtorl.serving.app import ServeArgs, build_app

    text = Path(served["config_out"]).read_text()
    assert text.startswith("#") and TOKEN not in text
    cfg = yaml.safe_load(text)
    ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(cfg)
    assert cfg["http_options"]["host"] == "127.0.0.1" and cfg["http_options"]["port"] == served["port"]
    (app,) = cfg["applications"]
    assert app["import_path"] == "mtorl.serving.app:build_app" and app["route_prefix"] == "/"
    assert app["args"]["checkpoint"] == served["checkpoint"] and app["args"]["auth_token_env"] == TOKEN_ENV
    # Serve validates the args against the builder's annotation
    built = call_user_app_builder_with_args_if_necessary(build_app, app["args"])
    assert type(built).__name__ == "Application"
    with pytest.raises(Exception, match="max_batch_size"):
        call_user_app_builder_with_args_if_necessary(build_app, {**app["args"], "max_batch_size": 0})
    with pytest.raises(Exception, match="auth_token_env"):
        ServeArgs.model_validate({"checkpoint": "s3://b/c", "host": "0.0.0.0"})


def test_refuses_to_start_without_auth_off_loopback(served: dict[str, Any]) -> None:
    from mtorl.serving.app import run_serve

    job = make_job("ServeJob", "x", {"checkpoint": served["checkpoint"], "host": "0.0.0.0", "port": _free_port()})
    with pytest.raises(SpecError, match="auth_token_env"):
        run_serve(job, blocking=False, progress=print)
    job = make_job("ServeJob", "x", {"checkpoint": served["checkpoint"], "port": _free_port(),
                                     "auth_token_env": "MTORL_TEST_UNSET_TOKEN"})
    with pytest.raises(SpecError, match="MTORL_TEST_UNSET_TOKEN"):
        run_serve(job, blocking=False, progress=print)


def _train_other(data: str) -> str:
    """Another checkpoint of the same data (other seed, one step): different weights."""
    from mtorl.training.driver import run_train

    job = make_job("TrainJob", "tiny-serve-update", {
        "data": data, "output": "s3://fixtures/runs", "window": {"length": 20},
        "model": {"hidden": 16, "tcn": {"levels": 2, "kernel_size": 2}, "attention": {"heads": 2}, "decoder_hidden": 16},
        "trainer": {"workers": 0, "epochs": 1, "batch_size": 64, "max_steps_per_epoch": 1, "seed": 1},
        "tracking": {"wandb": "disabled"}})
    return str(run_train(job, progress=print)["best_checkpoint"])


def test_zero_downtime_update(served: dict[str, Any], tiny_dataset: str) -> None:
    """Redeploy with another checkpoint while a client loop sends requests: none is lost."""
    from mtorl.serving.app import run_serve

    new_ckpt = _train_other(tiny_dataset)
    body = {"users": _users(served["manifest"], 2)}
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(headers=AUTH, timeout=120) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"{served['url']}/v1/recommend", json=body)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.append(r.json()["model_version"])
                except httpx.HTTPError as e:  # a dropped connection counts as a lost request
                    statuses.append(-1)
                    print("client error:", e)
                time.sleep(0.02)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        res = run_serve(_job(new_ckpt, served["port"]), blocking=False, progress=print)
        deadline = time.time() + 120
        while time.time() < deadline and (not versions or versions[-1] != res["model_version"]):
            time.sleep(0.2)
        n = len(statuses)
        while time.time() < deadline and len(statuses) < n + 3:  # a few more requests on the new version
            time.sleep(0.2)
    finally:
        stop.set()
        t.join(timeout=130)
    assert len(statuses) >= 5 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert res["model_version"] != served["model_version"]
    assert versions[0] == served["model_version"] and versions[-1] == res["model_version"]
