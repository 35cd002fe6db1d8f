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
    chans = man.channels
    return [{"user_id": f"u{start + i}",
             "journey": [{"channel": chans[(i + t) % len(chans)], "gain": float((i * t) % 2), "cost": 1.0 + (i + t) % 3,
                          "features": {f: float((3 * t + i) % 24) for f in man.step_features}} for t in range(steps)],
             "user_features": {f: 0.1 * (i % 7) - 0.3 for f in man.user_features}} for i in range(n)]


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
    assert m["data"]["channels"] == man.channels and m["data"]["step_features"] == man.step_features
    assert m["data"]["splits"]["train"]["users"] > 0 and m["spec"]["kind"] == "TrainJob"
    assert m["serving"]["max_journey_length"] == LIMITS["max_journey_length"]
    assert m["ensemble"] is None  # a single model (an ensemble's members and decision_overrides otherwise)


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
        assert set(u["channel_probs"]) == set(man.channels) == set(u["predicted_reward"])
        assert sum(u["channel_probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert u["recommended_channel"] in man.channels
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

    feat = man.step_features[0]
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
        ("cost beyond float32", body(lambda b: b["users"][0]["journey"][1].update(cost=1e39)), 422, "users[0].journey[1].cost"),
        ("feature 1e308", body(lambda b: b["users"][1]["journey"][0]["features"].update({feat: 1e308})), 422,
         f"users[1].journey[0].features.{feat}"),
        ("string for a number", body(lambda b: b["users"][0]["journey"][0].update(gain="1")), 422, "users[0].journey[0].gain"),
        ("boolean for a number", body(lambda b: b["users"][0]["journey"][2].update(cost=True)), 422, "users[0].journey[2].cost"),
        ("number for a channel", body(lambda b: b["users"][0]["journey"][0].update(channel=0)), 422, "users[0].journey[0].channel"),
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
    r = _post(url, content=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
              headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    # only application/json is parsed as JSON
    ok = json.dumps({"users": _users(served["manifest"], 1)}).encode()
    for ctype in (None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"):
        r = _post(url, content=ok, headers={**AUTH, **({"Content-Type": ctype} if ctype else {})})
        assert r.status_code == 415 and r.json()["detail"].startswith("content-type:"), (ctype, r.text[:300])
    assert _post(url, content=ok, headers={**AUTH, "Content-Type": "application/json; charset=utf-8"}).status_code == 200
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


@functools.cache  # one per test process: the update tests of every ingress module share it
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
    """Redeploy with another checkpoint while a client loop sends requests: none is lost, and none waits for
    the new model to load (the new replica starts and becomes healthy before the old one stops:
    max_surge_percent)."""
    assert_zero_downtime_update(served, tiny_dataset)


def assert_zero_downtime_update(served: dict[str, Any], tiny_dataset: str, **job_extra: Any) -> None:
    """``served``: run_serve's result plus ``manifest`` and ``port``; ``job_extra``: the ServeJob fields it was
    started with beyond ``_job``'s (the update keeps them)."""
    from mtorl.serving.app import run_serve

    new_ckpt = _train_other(tiny_dataset)
    body = {"users": _users(served["manifest"], 2)}
    statuses: list[int] = []
    versions: list[str] = []
    latency: list[float] = []
    sent: list[float] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(headers=AUTH, timeout=120) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{served['url']}/v1/recommend", json=body)
                    latency.append(time.perf_counter() - t0)
                    sent.append(t0)
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
        t_update = time.perf_counter()
        res = run_serve(_job(new_ckpt, served["port"], **job_extra), blocking=False, progress=print)
        t_done = time.perf_counter() - t_update
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
    slow = sorted(zip(latency, sent), reverse=True)[:5]
    print(f"update under load: {len(statuses)} requests, update took {t_done:.1f} s, max latency {max(latency):.3f} s; "
          "slowest (latency s, sent s after the update began): "
          + ", ".join(f"({lat:.3f}, {t0 - t_update:+.1f})" for lat, t0 in slow))
    # Stop-then-start (max_surge_percent 0) leaves clients without an answer while the new model loads: one
    # request waited 4.5-5.4 s, 68% of an update of 7.3 s. With surge the slowest request is the one competing
    # for CPU with the new replica's start-up: 0.05 s of 9.3 s on a quiet machine, 0.48-1.36 s at load average
    # 30-64 (BENCHMARKS.md) and once 2.07 s in CI. Both scale with the machine's load, so the bound is relative
    # to the update's own length, with a floor of 2 s.
    bound = max(2.0, 0.4 * t_done)
    assert max(latency) < bound, (f"a request waited {max(latency):.2f} s during an update of {t_done:.1f} s "
                                  f"(bound {bound:.2f} s): clients went unanswered while the new model loaded")
    assert res["model_version"] != served["model_version"]
    assert versions[0] == served["model_version"] and versions[-1] == res["model_version"]


# ------------------------------------------------------------------------------ hostile inputs, many at once

def generated_bad_bodies(man: dict[str, Any]) -> list[tuple[str, bytes, dict[str, str]]]:
    """At least 200 bad requests, generated: (name, raw body, extra headers). Every one must be a 4xx
    whose detail names a field (or ``body``/``content-type``), and none a 5xx."""
    feat, chan = man.step_features[0], man.channels[0]
    bad_numbers: list[Any] = ["1", "1.5", "", True, False, None, [], {}, [1.0], 1e39, -1e39, 1e308, -1e308,
                              3.5e38, "NaN", "abc"]
    raw_numbers = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 5000]
    spots: list[tuple[str, Any]] = [  # (field path, setter)
        ("users[0].journey[0].gain", lambda b, v: b["users"][0]["journey"][0].update(gain=v)),
        ("users[0].journey[1].cost", lambda b, v: b["users"][0]["journey"][1].update(cost=v)),
        ("users[1].journey[3].cost", lambda b, v: b["users"][1]["journey"][3].update(cost=v)),
        ("users[1].journey[2].gain", lambda b, v: b["users"][1]["journey"][2].update(gain=v)),
        (f"users[1].journey[2].features.{feat}", lambda b, v: b["users"][1]["journey"][2]["features"].update({feat: v})),
        ("users[0].next_features." + feat, lambda b, v: b["users"][0].update(
            next_features={**{f: 0.0 for f in man.step_features}, feat: v})),
    ]
    if man.user_features:
        uf = man.user_features[0]
        spots.append((f"users[1].user_features.{uf}", lambda b, v: b["users"][1]["user_features"].update({uf: v})))
    out: list[tuple[str, bytes, dict[str, str]]] = []
    marker = 987654.125

    for path, put in spots:
        for v in bad_numbers:
            b = {"users": _users(man, 2)}
            put(b, v)
            out.append((f"{path}={v!r}"[:80], json.dumps(b).encode(), {}))
        for tok in raw_numbers:
            b = {"users": _users(man, 2)}
            put(b, marker)
            out.append((f"{path}={tok[:12]}", json.dumps(b).replace(repr(marker), tok, 1).encode(), {}))
    for v in (0, 1.5, True, None, [], {}, "", "x" * 300):  # user ids and channels are strings from a known set
        b = {"users": _users(man, 2)}
        b["users"][0]["user_id"] = v
        out.append((f"user_id={v!r}"[:40], json.dumps(b).encode(), {}))
        b = {"users": _users(man, 2)}
        b["users"][1]["journey"][0]["channel"] = v
        out.append((f"channel={v!r}"[:40], json.dumps(b).encode(), {}))
    for shape in ([], "x", 1, None, True, {"users": None}, {"users": {}}, {"users": [1]}, {"users": [[]]}, {"users": [None]},
                  {"users": [{}]}, {"users": _users(man, 1), "extra": 1}, {"Users": _users(man, 1)},
                  {"users": [{**_users(man, 1)[0], "journey": "abc"}]}, {"users": [{**_users(man, 1)[0], "journey": [1, 2]}]},
                  {"users": [{**_users(man, 1)[0], "journey": [{"channel": chan}]}]},
                  {"users": [{**_users(man, 1)[0], "user_features": [0.1]}]},
                  {"users": _users(man, 1) + _users(man, 1)}):  # duplicate user ids
        out.append((f"shape {json.dumps(shape)[:40]}", json.dumps(shape).encode(), {}))
    good = json.dumps({"users": _users(man, 2)}).encode()
    for cut in range(1, len(good), max(1, len(good) // 25)):  # truncated bodies
        out.append((f"truncated at {cut}", good[:cut], {}))
    for raw in (b"", b"\xff\xfe\x00{", "{\"users\": [\"\u00e9\"]}".encode("utf-16"), b"[" * 100_000, b"{" * 50_000,
                b'{"users": [' + b"1," * 5000 + b"1]}", b"\x00" * 64, b"null", b"{'users': []}"):
        out.append((f"raw {raw[:12]!r}", raw, {}))
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                  "application/xml", "text/json", "", "application/json-patch+json"):
        out.append((f"content-type {ctype!r}", good, {"Content-Type": ctype}))
    assert len(out) >= 200, len(out)
    return out


def assert_no_5xx_for_bad_bodies(url: str, man: dict[str, Any]) -> int:
    """Send every generated bad body (16 at a time); return how many were sent."""
    cases = generated_bad_bodies(man)

    async def go() -> list[tuple[str, httpx.Response]]:
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=120) as c:
            async def one(name: str, body: bytes, extra: dict[str, str]) -> tuple[str, httpx.Response]:
                async with sem:
                    headers = {**AUTH, "Content-Type": "application/json", **extra}
                    return name, await c.post(url, content=body, headers=headers)
            return await asyncio.gather(*[one(*c) for c in cases])

    wrong = []
    for name, r in asyncio.run(go()):
        detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else None
        if not (400 <= r.status_code < 500) or not isinstance(detail, str) or ":" not in detail:
            wrong.append((name, r.status_code, r.text[:200]))
    assert not wrong, f"{len(wrong)} of {len(cases)} bad bodies were not a 4xx naming a field: {wrong[:10]}"
    return len(cases)


def test_generated_bad_bodies_are_4xx_never_5xx(served: dict[str, Any]) -> None:
    n = assert_no_5xx_for_bad_bodies(f"{served['url']}/v1/recommend", served["manifest"])
    assert n >= 200
    r = _post(f"{served['url']}/v1/recommend", json={"users": _users(served["manifest"], 2)}, headers=AUTH)
    assert r.status_code == 200, r.text  # and the server still serves


def poisoned_bodies(man: dict[str, Any]) -> list[dict[str, Any]]:
    """Bodies that used to fail the whole batch they joined: values beyond float32 (``1e39``, ``1e308``), and
    values just inside it whose normalised state or model output can overflow float32."""
    feat = man.step_features[0]
    out = []
    for i, (where, v) in enumerate([("cost", 1e39), ("feature", 1e308), ("feature", 3.4e38), ("feature", -3.4e38),
                                    ("gain", 3.0e38), ("cost", 3.3e38)]):
        b = {"users": _users(man, 2, start=1000 + 10 * i)}
        step = b["users"][1]["journey"][1]
        if where == "feature":
            step["features"][feat] = v
        else:
            step[where] = v
        out.append(b)
    return out


def assert_poison_fails_alone(url: str, man: dict[str, Any], rounds: int = 10) -> None:
    """Rounds of 16 concurrent requests, valid and poisoned interleaved: every valid one is a 200 with its
    own users; no poisoned one is a 5xx (those beyond float32 are 4xx; extreme in-range values may be served)."""
    poison = poisoned_bodies(man)

    async def go() -> list[tuple[bool, int, Any, httpx.Response]]:
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as c:
            out = []
            for r in range(rounds):
                reqs = []
                for k in range(16):
                    if k % 2 == 0:
                        start = 100 * r + k
                        reqs.append((True, start, c.post(url, json={"users": _users(man, 2, start=start)})))
                    else:
                        reqs.append((False, 0, c.post(url, json=poison[(r + k) % len(poison)])))
                rs = await asyncio.gather(*[q for _, _, q in reqs])
                out += [(ok, start, None, resp) for (ok, start, _), resp in zip(reqs, rs)]
            return out

    valid_failed, poison_not_4xx = [], []
    for ok, start, _, r in asyncio.run(go()):
        if ok:
            if r.status_code != 200 or r.json()["users"][0]["user_id"] != f"u{start}":
                valid_failed.append((r.status_code, r.text[:200]))
        elif r.status_code >= 500:
            poison_not_4xx.append((r.status_code, r.text[:200]))
    assert not valid_failed, f"{len(valid_failed)} of {8 * rounds} valid requests failed: {valid_failed[:5]}"
    assert not poison_not_4xx, poison_not_4xx[:5]


def test_poisoned_requests_fail_alone(served: dict[str, Any]) -> None:
    before = _get(f"{served['url']}/v1/model", headers=AUTH).json()["stats"]
    assert_poison_fails_alone(f"{served['url']}/v1/recommend", served["manifest"])
    after = _get(f"{served['url']}/v1/model", headers=AUTH).json()["stats"]
    assert after["batches"] - before["batches"] < after["requests"] - before["requests"]  # they were batched


def listening_sockets(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN state that one of ``pids`` holds (Linux /proc)."""
    import ipaddress

    by_inode: dict[str, tuple[str, int]] = {}
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if f[3] != "0A":  # LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            # /proc prints each 32-bit word in host (little-endian) order
            addr = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
            by_inode[f[9]] = (str(ipaddress.ip_address(addr)), int(hexport, 16))
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in by_inode:
                out.append((*by_inode[link[8:-1]], pid))
    return out


def _children(pids: set[int]) -> set[int]:
    """Processes whose parent is one of ``pids`` (Linux /proc)."""
    out = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) in pids:
            out.add(int(p))
    return out


def serve_listeners() -> tuple[list[tuple[str, int, int]], set[int], set[int]]:
    """The listening sockets of Serve's processes (controller, proxies or HAProxy, replicas) on this node, the ports
    of those actors' own Ray worker RPC servers (Ray's internal ports, not Serve's) and the replicas' pids."""
    from ray._private.state import actors

    names = ("ServeController", "ProxyActor", "HAProxyManager", "ServeReplica")
    table = [a for a in actors().values() if a.get("State") == "ALIVE"
             and str(a.get("ActorClassName", "")).startswith(names)]
    pids = {int(a["Pid"]) for a in table if a.get("Pid")}
    assert pids, "no Serve process found"
    pids |= _children(pids)  # the HAProxy processes of ingress 'haproxy'

    ray_rpc = {int(a["Address"]["Port"]) for a in table if a.get("Address", {}).get("Port")}
    replicas = {int(a["Pid"]) for a in table if str(a.get("ActorClassName", "")).startswith("ServeReplica")}
    return listening_sockets(pids), ray_rpc, replicas


def assert_serve_binds_loopback_only(port: int) -> None:
    """The HTTP sockets Serve opens for mtorl (the proxy's, a direct-ingress replica's) listen on loopback
    only, and nothing listens on HAProxy's stats/metrics ports.

    Two kinds of socket are Ray's own and set by the cluster, not by the ServeSpec: each actor's Ray worker
    RPC port (on the node address), and each replica's inter-deployment gRPC server, which Ray 2.60 binds
    on ``[::]:0`` unconditionally (``ray/serve/_private/replica.py``, ``_on_initialized``; no setting
    changes it). They are allowed here, one gRPC port per replica at most, and documented in OPERATIONS.md."""
    import ipaddress

    socks, ray_rpc, replicas = serve_listeners()
    on_port = {a for a, p, _ in socks if p == port}
    assert on_port == {"127.0.0.1"}, (port, socks)
    assert not [s for s in socks if s[1] in (8404, 9101)], socks
    wide = [s for s in socks if s[1] not in ray_rpc and not ipaddress.ip_address(s[0]).is_loopback]
    inter_deployment = [s for s in wide if s[2] in replicas and ipaddress.ip_address(s[0]).is_unspecified]
    per_replica = {pid: sum(1 for s in inter_deployment if s[2] == pid) for pid in replicas}
    assert all(n <= 1 for n in per_replica.values()), per_replica
    rest = [s for s in wide if s not in inter_deployment]
    assert not rest, f"Serve listens beyond loopback: {rest} (Ray RPC ports {sorted(ray_rpc)})"


def test_listening_sockets_are_loopback_only(served: dict[str, Any]) -> None:
    assert_serve_binds_loopback_only(served["port"])


# ------------------------------------------------------------------------------ a crashed replica (last: it kills one)

def _replica_pids() -> set[int]:
    from ray._private.state import actors

    return {int(a["Pid"]) for a in actors().values() if a.get("State") == "ALIVE" and a.get("Pid")
            and str(a.get("ActorClassName", "")).startswith("ServeReplica")}


def test_replica_crash_is_503_then_recovers(served: dict[str, Any]) -> None:
    """SIGKILL the replica's process under load (4 clients): no request gets a 5xx but a 503 with Retry-After
    (the in-flight ones, and those that would wait for the replacement), none waits long, a new replica
    replaces the dead one and serves within a bound. Last in the module: the others keep their replica."""
    import signal

    body = {"users": _users(served["manifest"], 2)}
    log: list[tuple[float, float, int, str]] = []  # (sent, latency s, status or -1, Retry-After or error)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(headers=AUTH, timeout=120) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{served['url']}/v1/recommend", json=body)
                    log.append((t0, time.perf_counter() - t0, r.status_code, r.headers.get("retry-after", "")))
                except httpx.HTTPError as e:  # a dropped connection counts as a failure
                    log.append((t0, time.perf_counter() - t0, -1, type(e).__name__))
                time.sleep(0.02)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        (pid,) = _replica_pids()
        t_kill = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 90
        while time.time() < deadline and len([e for e in log if e[0] > t_kill + 0.5 and e[2] == 200]) < 8:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=130)
    after = sorted(e for e in log if e[0] + e[1] > t_kill)  # answered after the kill
    codes = {s: sum(1 for e in after if e[2] == s) for s in {e[2] for e in after}}
    back = [e[0] + e[1] - t_kill for e in after if e[2] == 200 and e[0] > t_kill]
    print(f"replica crash under load: {len(after)} requests answered after the kill {codes}, max latency "
          f"{max(e[1] for e in after):.2f} s, first 200 sent after the kill answered {min(back, default=-1):.1f} s after it")
    wrong = [e for e in after if e[2] != 200 and not (e[2] == 503 and e[3].isdigit())]
    assert not wrong, f"requests failed otherwise than 503 + Retry-After: {wrong[:5]} ({codes})"
    # 503s come fast (the guard's 2 s wait while degraded + a loaded machine's margin), and no request hangs.
    assert max(e[1] for e in after) < 8.0, sorted(after, key=lambda e: -e[1])[:5]
    assert len(back) >= 8 and min(back) < 60, "serving did not resume within 60 s of the crash"
    assert _replica_pids() and pid not in _replica_pids()
