"""Serving request validation and preprocessing (no Ray): the same states and rewards as the data pipeline."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from mtorl.data.manifest import Manifest
from mtorl.data.windows import journeys_from_table
from mtorl.evaluation.allocation import allocate_requests
from mtorl.evaluation.decision import decide
from mtorl.serving.schemas import (
    AllocateRequest, Limits, Preprocessor, RecommendRequest, RequestError, allocation, parse_request, recommend_scores, recommendations,
)

BASE: dict[str, Any] = {
    "schema_version": 1, "version": "v1", "splits": {},
    "channels": ["search", "social", "video"],
    "step_features": ["hour", "depth", "device=ios", "device=web"],
    "user_features": ["age"],
    "categorical": {"device": ["ios", "web"]},
    "normalization": {"mean": [11.0, 2.0, 0.5, 0.5, 30.0], "std": [6.0, 1.5, 0.5, 0.5, 10.0]},
    "penalty": 0.1,
    "reward_norm": {"min": -0.3, "max": 0.9},
}
MANIFEST = Manifest.model_validate(BASE)


def _user(uid: str = "u1", steps: int = 3, **kw: Any) -> dict[str, Any]:
    j = [{"channel": MANIFEST.channels[t % 3], "gain": float(t % 2), "cost": 1.0 + t,
          "features": {"hour": 3.0 * t, "depth": 1.0 + t, "device=ios": float(t % 2)}} for t in range(steps)]
    return {"user_id": uid, "journey": j, "user_features": {"age": 41.0}, **kw}


def _pre(**limits: int) -> Preprocessor:
    return Preprocessor(MANIFEST, Limits(**limits))


def _err(body: Any, model: type = RecommendRequest, pre: Preprocessor | None = None) -> RequestError:
    with pytest.raises(RequestError) as e:
        req = parse_request(model, json.loads(json.dumps(body)) if not isinstance(body, str) else json.loads(body))
        (pre or _pre()).prepare(req.users)
    return e.value


def test_state_and_reward_equal_the_data_pipeline() -> None:
    u = _user(steps=4)
    req = parse_request(RecommendRequest, {"users": [u]})
    p = _pre().prepare(req.users)
    # the same journey as a prepared-dataset row (features row-major in step_features order)
    feats = [[s["features"].get(f, 0.0) for f in MANIFEST.step_features] for s in u["journey"]]
    row = {"user_id": ["u1"], "channel": [np.array([0, 1, 2, 0])], "gain": [np.array([s["gain"] for s in u["journey"]])],
           "cost": [np.array([s["cost"] for s in u["journey"]])], "propensity": [np.full(4, np.nan)],
           "features": [np.array(feats).reshape(-1)], "user_features": [np.array([41.0])]}
    ref = journeys_from_table(row, MANIFEST)[0]
    got = p.journeys[0]
    np.testing.assert_allclose(got.state, ref.state, rtol=1e-6)
    np.testing.assert_allclose(got.reward, ref.reward, rtol=1e-6)
    np.testing.assert_array_equal(got.channel, ref.channel)
    # hand-computed: step 1 hour=3 -> (3-11)/6; age (41-30)/10; ios one-hot 1 -> (1-.5)/.5
    np.testing.assert_allclose(got.state[1], [(3 - 11) / 6, (2 - 2) / 1.5, 1.0, -1.0, 1.1], rtol=1e-6)
    # reward: clip((g - 0.1 w - min) / (max - min)); step 1: g=1, w=2 -> (0.8 + 0.3) / 1.2
    assert got.reward[1] == pytest.approx(1.1 / 1.2, rel=1e-6)
    # no next_features: the last state is carried forward
    np.testing.assert_allclose(p.next_states[0], got.state[-1])


def test_feature_order_is_the_manifests_not_the_requests() -> None:
    a = _user()
    b = json.loads(json.dumps(a))
    for s in b["journey"]:
        s["features"] = dict(reversed(list(s["features"].items())))
    pa = _pre().prepare(parse_request(RecommendRequest, {"users": [a]}).users)
    pb = _pre().prepare(parse_request(RecommendRequest, {"users": [b]}).users)
    np.testing.assert_array_equal(pa.journeys[0].state, pb.journeys[0].state)


def test_complete_and_partial_feature_sets_give_the_same_states() -> None:
    """Steps naming every feature (the unchecked fast path) and steps leaving an optional one-hot column out
    (the checked path, which defaults it to 0) build the same states; mixed within one journey too."""
    a = _user(steps=5)
    b = json.loads(json.dumps(a))
    for t, s in enumerate(b["journey"]):
        if t % 2 == 0:
            s["features"] = {"device=web": 0.0, **dict(reversed(list(s["features"].items())))}
            assert set(s["features"]) == set(MANIFEST.step_features)
    pa = _pre().prepare(parse_request(RecommendRequest, {"users": [a]}).users)
    pb = _pre().prepare(parse_request(RecommendRequest, {"users": [b]}).users)
    np.testing.assert_array_equal(pa.journeys[0].state, pb.journeys[0].state)
    np.testing.assert_array_equal(pa.next_states, pb.next_states)


def test_recommendations_scored_for_a_batch_equal_per_request() -> None:
    """The server scores the users of many requests in one call; each row must come out as if alone."""
    pre = _pre()
    reqs = [pre.prepare(parse_request(RecommendRequest, {"users": [_user(f"u{i}{k}", steps=1 + (i + k) % 3) for k in range(1 + i)]}).users)
            for i in range(3)]
    probs, reward = _fake_outputs(sum(len(p) for p in reqs))
    scored = recommend_scores(probs, reward, np.concatenate([p.costs for p in reqs]))
    s = 0
    for p in reqs:
        sl = slice(s, s + len(p))
        together = recommendations(p, probs[sl], reward[sl], MANIFEST.channels, scored=(scored[0][sl], scored[1][sl]))
        assert together == recommendations(p, probs[sl], reward[sl], MANIFEST.channels)
        s += len(p)


def test_next_features_and_optional_one_hot_columns() -> None:
    u = _user(next_features={"hour": 23.0, "depth": 5.0, "device=web": 1.0})
    p = _pre().prepare(parse_request(RecommendRequest, {"users": [u]}).users)
    np.testing.assert_allclose(p.next_states[0], [(23 - 11) / 6, 2.0, -1.0, 1.0, 1.1], rtol=1e-6)


def test_channel_costs_most_recent_then_manifest_mean_then_one() -> None:
    u = _user(steps=2)  # search cost 1, social cost 2
    u["journey"].append({"channel": "search", "gain": 0.0, "cost": 5.0, "features": {"hour": 1.0, "depth": 1.0}})
    req = parse_request(RecommendRequest, {"users": [u]})
    np.testing.assert_array_equal(_pre().prepare(req.users).costs[0], [5.0, 2.0, 1.0])
    man = Manifest.model_validate(dict(BASE, channel_cost_mean={"video": 3.5}))
    np.testing.assert_array_equal(Preprocessor(man).prepare(req.users).costs[0], [5.0, 2.0, 3.5])


@pytest.mark.parametrize("mutate, field, words", [
    (lambda b: b["users"][0]["journey"][1].update(channel="tv"), "users[0].journey[1].channel", "unknown channel 'tv'"),
    (lambda b: b["users"][0]["journey"][2]["features"].update(foo=1.0), "users[0].journey[2].features.foo", "unknown feature"),
    (lambda b: b["users"][0]["journey"][0]["features"].pop("hour"), "users[0].journey[0].features", "wrong feature count"),
    (lambda b: b["users"][0].update(user_features={}), "users[0].user_features", "wrong user feature count"),
    (lambda b: b["users"][0].update(user_features={"age": 1.0, "income": 2.0}), "users[0].user_features.income", "unknown user feature"),
    (lambda b: b["users"][0].update(next_features={"hour": 1.0, "depth": 1.0, "bar": 1.0}), "users[0].next_features.bar", "unknown feature"),
    (lambda b: b["users"][0].update(journey=[]), "users[0].journey", "empty journey"),
    (lambda b: b["users"][0]["journey"].extend(_user(steps=4)["journey"]), "users[0].journey", "limit is 5"),
    (lambda b: b["users"].extend([_user(f"x{i}") for i in range(3)]), "users", "limit is 3"),
    (lambda b: b.update(users=[]), "users", "at least one user"),
    (lambda b: b["users"].append(_user("u1")), "users[1].user_id", "duplicate user_id"),
    (lambda b: b["users"][0]["journey"][0].update(cost=-1.0), "users[0].journey[0].cost", "greater than or equal to 0"),
    (lambda b: b["users"][0]["journey"][0].update(gain="abc"), "users[0].journey[0].gain", "valid number"),
    (lambda b: b["users"][0]["journey"][0].pop("gain"), "users[0].journey[0].gain", "Field required"),
    (lambda b: b["users"][0].update(userid="x"), "users[0].userid", "Extra inputs"),
])
def test_bad_input_names_the_field(mutate: Any, field: str, words: str) -> None:
    body = {"users": [_user(steps=3)]}
    mutate(body)
    e = _err(body, pre=_pre(max_users=3, max_journey_length=5))
    assert e.status == 422
    assert e.detail.startswith(field + ":"), e.detail
    assert words in e.detail, e.detail


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_inf_are_rejected(token: str) -> None:
    raw = json.dumps({"users": [_user()]}).replace('"hour": 3.0', f'"hour": {token}', 1)
    assert token in raw
    e = _err(raw)
    assert e.detail.startswith("users[0].journey[1].features.hour:") and "finite" in e.detail, e.detail
    raw = json.dumps({"users": [_user()], "budget": 1.0}).replace('"budget": 1.0', f'"budget": {token}')
    assert _err(raw, AllocateRequest).detail.startswith("budget:")


def test_allocate_request_needs_a_budget() -> None:
    e = _err({"users": [_user()]}, AllocateRequest)
    assert e.detail.startswith("budget:") and "required" in e.detail


def _fake_outputs(b: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=b)  # (B, C)
    reward = rng.random((b, 3))                # (B, C)
    return probs, reward


def test_recommendation_and_allocation_use_the_evaluation_code() -> None:
    users = [_user(f"u{i}", steps=1 + i % 3) for i in range(6)]
    p = _pre().prepare(parse_request(RecommendRequest, {"users": users}).users)
    probs, reward = _fake_outputs(6)
    recs = recommendations(p, probs, reward, MANIFEST.channels)
    for b, r in enumerate(recs):
        c = int(decide(reward[b:b + 1], probs[b:b + 1], p.costs[b:b + 1]).channel[0])  # the decision layer
        assert r["recommended_channel"] == MANIFEST.channels[c]
        assert r["expected_reward"] == pytest.approx(reward[b, c])
        assert sum(r["channel_probs"].values()) == pytest.approx(1.0)
    res = allocation(p, probs, reward, MANIFEST.channels, budget=4.0, penalty=None)
    ref = allocate_requests([(u, reward[b], probs[b], p.costs[b]) for b, u in enumerate(p.user_ids)], 4.0, None,
                            MANIFEST.channels)
    assert [s["user_id"] for s in res["selected"]] == [s["user_id"] for s in ref["selected"]]
    assert res["spend"] == pytest.approx(ref["spend"]) and res["spend"] <= 4.0
    assert res["total_expected_reward"] == pytest.approx(sum(s["expected_reward"] for s in res["selected"]))
    # under the budget the channel is the decision layer's at the solved penalty s (the multiplier);
    # /v1/recommend has no budget: s = 0
    at_s = decide(reward, probs, p.costs, penalty=res["multiplier"]).channel
    row = {u: b for b, u in enumerate(p.user_ids)}
    for s in res["selected"]:
        assert s["channel"] == MANIFEST.channels[at_s[row[s["user_id"]]]]


def test_serving_imports_leave_out_the_evaluation_reports() -> None:
    """The replica imports the allocation code, not scikit-learn/SciPy/matplotlib with the rest of
    ``mtorl.evaluation`` (844 modules, 1.2 s on a replica's first request); the package's names still resolve."""
    import subprocess
    import sys

    code = ("import sys, mtorl.serving.app, mtorl.serving.predictor, mtorl.evaluation.allocation\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'matplotlib'})\n"
            "assert not heavy, heavy\n"
            "import mtorl.evaluation as e\n"
            "assert all(callable(getattr(e, n)) for n in e.__all__)\n"
            "assert 'sklearn' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b["users"][0]["journey"][0].update(gain="1"), "users[0].journey[0].gain"),
    (lambda b: b["users"][0]["journey"][0].update(gain=True), "users[0].journey[0].gain"),
    (lambda b: b["users"][0]["journey"][1].update(cost="2.5"), "users[0].journey[1].cost"),
    (lambda b: b["users"][0]["journey"][1]["features"].update(hour="3"), "users[0].journey[1].features.hour"),
    (lambda b: b["users"][0]["journey"][1]["features"].update(hour=False), "users[0].journey[1].features.hour"),
    (lambda b: b["users"][0].update(user_id=7), "users[0].user_id"),
    (lambda b: b["users"][0]["journey"][0].update(channel=1), "users[0].journey[0].channel"),
])
def test_strict_types_nothing_is_coerced(mutate: Any, field: str) -> None:
    body = {"users": [_user()]}
    mutate(body)
    e = _err(body)
    assert e.status == 422 and e.detail.startswith(field + ":"), e.detail


def test_integers_are_numbers() -> None:
    body = {"users": [_user()]}
    body["users"][0]["journey"][0].update(gain=1, cost=2)
    p = _pre().prepare(parse_request(RecommendRequest, body).users)
    assert p.journeys[0].gain[0] == 1.0 and p.costs[0][0] == 2.0


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b["users"][0]["journey"][0].update(cost=1e39), "users[0].journey[0].cost"),
    (lambda b: b["users"][0]["journey"][2].update(gain=-1e39), "users[0].journey[2].gain"),
    (lambda b: b["users"][0]["journey"][1]["features"].update(depth=1e308), "users[0].journey[1].features.depth"),
    (lambda b: b["users"][0].update(user_features={"age": -1e308}), "users[0].user_features.age"),
    # in float32 range, but (x - mean) / std is not: 3.4e38 / 0.5 overflows float32
    (lambda b: b["users"][0]["journey"][2]["features"].update({"device=ios": 3.4e38}), "users[0].journey[2].features.device=ios"),
    (lambda b: b["users"][0].update(next_features={"hour": 1.0, "depth": 1.0, "device=web": -3.4e38}),
     "users[0].next_features.device=web"),
])
def test_values_beyond_float32_are_refused_naming_the_field(mutate: Any, field: str) -> None:
    body = {"users": [_user()]}
    mutate(body)
    e = _err(body)
    assert e.status == 422 and e.detail.startswith(field + ":"), e.detail
    assert "float32" in e.detail, e.detail


def test_raw_bodies_parse_in_one_pass() -> None:
    from mtorl.serving.schemas import parse_body

    good = json.dumps({"users": [_user()], "budget": 2}).encode()
    assert parse_body(AllocateRequest, good).budget == 2.0
    for raw in (b"{users: [", b"", b"\xff\xfe", "{}".encode("utf-16"), b"[" * 10_000):
        with pytest.raises(RequestError) as e:
            parse_body(RecommendRequest, raw)
        assert e.value.status == 400 and e.value.detail.startswith("body:"), (raw[:10], e.value.detail)
    with pytest.raises(RequestError) as e:
        parse_body(RecommendRequest, json.dumps({"users": [_user()]}).replace('"hour": 3.0', '"hour": NaN', 1))
    assert e.value.status == 422 and e.value.detail.startswith("users[0].journey[1].features.hour:")


def test_micro_batcher_batches_and_keeps_answers_apart() -> None:
    import asyncio

    from mtorl.serving.service import MicroBatcher

    sizes: list[int] = []

    def fn(items: list[int]) -> list[Any]:
        sizes.append(len(items))
        return [ValueError(f"bad {x}") if x % 5 == 0 else x * 10 for x in items]

    async def go() -> list[Any]:
        b: MicroBatcher[int, Any] = MicroBatcher(fn, max_batch_size=8, wait_s=0.05)
        first = await asyncio.gather(*[b(i) for i in range(1, 21)])
        return list(first) + [await b(21)]

    out = asyncio.run(go())
    assert [o for o in out if not isinstance(o, ValueError)] == [10 * i for i in range(1, 22) if i % 5]
    assert [str(o) for o in out if isinstance(o, ValueError)] == ["bad 5", "bad 10", "bad 15", "bad 20"]
    assert sizes == [8, 8, 4, 1]


@pytest.mark.parametrize("extra, field", [({"budget": -1.0}, "budget"), ({"budget": 1e39}, "budget"),
                                          ({"budget": 1.0, "penalty": -0.1}, "penalty"), ({"budget": True}, "budget")])
def test_budget_and_penalty_are_non_negative_float32_numbers(extra: dict[str, Any], field: str) -> None:
    e = _err({"users": [_user()], **extra}, AllocateRequest)
    assert e.status == 422 and e.detail.startswith(field + ":"), e.detail


def test_serving_acts_by_the_checkpoints_decision_block() -> None:
    """The replica's decision layer is the checkpoint's ``decision:`` block (here tau = 1: only the logger's
    most likely channel), and the allocation reports the s it solved, not the request's floor."""
    from mtorl.spec import DecisionSpec

    users = [_user(f"u{i}", steps=1 + i % 3) for i in range(8)]
    p = _pre().prepare(parse_request(RecommendRequest, {"users": users}).users)
    probs, reward = _fake_outputs(8)
    strict = DecisionSpec(support_threshold=1.0)
    best, _ = recommend_scores(probs, reward, p.costs, strict)
    assert list(best) == list(probs.argmax(axis=1))
    free, _ = recommend_scores(probs, reward, p.costs, DecisionSpec(support_threshold=0.0))
    assert list(free) == list(decide(reward, None, p.costs, DecisionSpec(support_threshold=0.0)).channel)
    assert list(free) != list(best)  # the fake outputs make the two rules disagree somewhere
    res = allocation(p, probs, reward, MANIFEST.channels, budget=2.0, penalty=0.0, decision=strict)
    ref = decide(reward, probs, p.costs, strict, budget=2.0)
    assert res["penalty"] == pytest.approx(ref.penalty) and res["penalty"] == res["multiplier"] and res["penalty"] > 0
    assert {s["user_id"] for s in res["selected"]} == {p.user_ids[i] for i in np.flatnonzero(ref.served)}


def _per_user(pre: Preprocessor, users: Any) -> Any:
    """``prepare`` the way it was before the batch path: ``Preprocessor.user`` for each user."""
    out = [pre.user(i, u) for i, u in enumerate(users)]
    return [o[0] for o in out], np.stack([o[1] for o in out]).astype(np.float32), np.stack([o[2] for o in out])


def test_batch_preprocessing_equals_the_per_user_path() -> None:
    """The numpy path over all users' steps gives the per-user path's arrays to the bit: mixed lengths,
    one-hot columns left out on some steps, next_features on some users, channels logged or not."""
    rng = np.random.default_rng(0)
    users = []
    for i in range(12):
        T = int(rng.integers(1, 9))
        j = [{"channel": MANIFEST.channels[int(rng.integers(3))], "gain": float(rng.integers(2)),
              "cost": float(rng.uniform(0, 4)),
              "features": {"hour": float(rng.uniform(0, 23)), "depth": float(rng.integers(1, 9)),
                           **({"device=ios": 1.0} if rng.random() < 0.5 else {}),
                           **({"device=web": 0.0} if rng.random() < 0.3 else {})}} for _ in range(T)]
        u: dict[str, Any] = {"user_id": f"u{i}", "journey": j, "user_features": {"age": float(rng.uniform(18, 80))}}
        if i % 3 == 0:
            u["next_features"] = {"hour": 5.0, "depth": 2.0, "device=web": 1.0}
        users.append(u)
    req = parse_request(RecommendRequest, {"users": users})
    pre = _pre()
    got = pre.prepare(req.users)
    assert pre._prepare_batch(req.users) is not None  # the batch path ran
    journeys, nxt, costs = _per_user(pre, req.users)
    assert got.user_ids == [u["user_id"] for u in users]
    for a, b in zip(got.journeys, journeys):
        assert a.user_id == b.user_id
        for f in ("channel", "gain", "cost", "propensity", "state", "reward"):
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == y.dtype and x.shape == y.shape, f
            np.testing.assert_array_equal(x, y, err_msg=f)
    assert got.next_states.dtype == nxt.dtype and got.costs.dtype == costs.dtype
    np.testing.assert_array_equal(got.next_states, nxt)
    np.testing.assert_array_equal(got.costs, costs)


@pytest.mark.parametrize("bad", ["channel", "feature", "user_feature", "range", "next"])
def test_batch_preprocessing_hands_bad_users_to_the_per_user_path(bad: str) -> None:
    """A refused user anywhere in the batch: the same error (field and message) as the per-user path."""
    users = [_user(f"u{i}", steps=3) for i in range(4)]
    u = users[2]
    if bad == "channel":
        u["journey"][1]["channel"] = "tv"
    elif bad == "feature":
        u["journey"][2]["features"]["foo"] = 1.0
    elif bad == "user_feature":
        u["user_features"] = {}
    elif bad == "range":
        u["journey"][0]["features"]["hour"] = 3e38
        BASE2 = {**BASE, "normalization": {"mean": [11.0, 2.0, 0.5, 0.5, 30.0], "std": [1e-3, 1.5, 0.5, 0.5, 10.0]}}
        pre = Preprocessor(Manifest.model_validate(BASE2))
    else:
        u["next_features"] = {"hour": 1.0}
    pre = pre if bad == "range" else _pre()
    req = parse_request(RecommendRequest, {"users": users})
    assert pre._prepare_batch(req.users) is None
    with pytest.raises(RequestError) as batch:
        pre.prepare(req.users)
    with pytest.raises(RequestError) as alone:
        pre.user(2, req.users[2])
    assert batch.value.detail == alone.value.detail and batch.value.detail.startswith("users[2]")


def test_recommendations_equal_the_per_element_formula() -> None:
    """The tolist() response rows equal the per-element float() ones they replaced, value for value."""
    rng = np.random.default_rng(1)
    req = parse_request(RecommendRequest, {"users": [_user(f"u{i}", steps=2) for i in range(5)]})
    p = _pre().prepare(req.users)
    probs = rng.dirichlet(np.ones(3), size=5).astype(np.float32)
    reward = rng.uniform(0, 1, size=(5, 3)).astype(np.float32)
    best, kb = recommend_scores(probs, reward, p.costs)
    ch = MANIFEST.channels
    want = [{"user_id": uid, "channel_probs": {c: float(probs[b, k]) for k, c in enumerate(ch)},
             "recommended_channel": ch[int(best[b])],
             "predicted_reward": {c: float(reward[b, k]) for k, c in enumerate(ch)},
             "expected_reward": float(reward[b, int(best[b])]), "cost": float(kb[b])} for b, uid in enumerate(p.user_ids)]
    got = recommendations(p, probs, reward, ch, scored=(best, kb))
    assert got == want and json.dumps(got) == json.dumps(want)
