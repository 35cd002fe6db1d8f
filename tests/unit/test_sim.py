"""Simulator: reproducibility, ground truth vs. empirical data, closed loop under a budget, calibration."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtorl.sim import (Simulator, calibrate, dataset_stats, journeys_format, logging_policy, observable_oracle_policy, ope_error,
                       oracle_policy, random_policy,
                       read_journeys, run_online, simulate, true_policy_value)
from mtorl.data.manifest import load_manifest
from mtorl.spec.models import JourneysFormat, SimulateSpec


def _spec(out: Path, **kw: Any) -> SimulateSpec:
    base: dict[str, Any] = {"output": str(out), "users": 3000, "mean_steps": 12.0, "shard_steps": 20_000, "seed": 3}
    base.update(kw)
    return SimulateSpec(**base)


def _read_all(out: Path) -> pa.Table:
    meta = json.loads((out / "simulation.json").read_text())
    return pa.concat_tables([pq.read_table(out / s["path"]) for s in meta["shards"]])


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulateSpec, dict[str, Any], pa.Table]:
    out = tmp_path_factory.mktemp("sim") / "journeys"
    spec = _spec(out)
    meta = simulate(spec, progress=None, block_users=1000)
    return spec, meta, _read_all(out)


def test_output_columns_and_sidecar(generated: tuple[SimulateSpec, dict[str, Any], pa.Table]) -> None:
    spec, meta, tab = generated
    expected = {"user_id": pa.string(), "timestamp": pa.int64(), "channel": pa.string(), "gain": pa.float32(),
                "cost": pa.float32(), "propensity": pa.float32(), "hour_sin": pa.float32(), "hour_cos": pa.float32(),
                "recency": pa.float32(), **{f"f{i}": pa.float32() for i in range(spec.n_features)}}
    for name, typ in expected.items():
        assert tab.schema.field(name).type == typ, name
    assert tab.num_rows == meta["steps"] == sum(s["steps"] for s in meta["shards"])
    assert len(set(tab.column("user_id").to_pylist())) == spec.users
    assert set(tab.column("channel").to_pylist()) <= set(spec.channels)
    assert set(np.unique(tab.column("gain").to_numpy())) <= {0.0, 1.0}
    cost = dict(zip(spec.channels, [1.0, 2.0, 3.0]))
    assert np.allclose(tab.column("cost").to_numpy(), [cost[c] for c in tab.column("channel").to_pylist()])
    assert journeys_format(spec.output) == meta["journeys"]
    fmt = JourneysFormat(**meta["journeys"])  # the sidecar mapping is a valid prepare --source journeys mapping
    assert fmt.propensity_col == "propensity" and fmt.user_features == [f"f{i}" for i in range(spec.n_features)]
    # time order within a user, user rows contiguous
    uid = tab.column("user_id").to_numpy(zero_copy_only=False)
    ts = tab.column("timestamp").to_numpy()
    same = uid[1:] == uid[:-1]
    assert np.all(ts[1:][same] > ts[:-1][same])
    assert (~same).sum() + 1 == spec.users


def test_same_seed_same_output_other_seed_differs(tmp_path: Path) -> None:
    a = simulate(_spec(tmp_path / "a", users=400), progress=None)
    b = simulate(_spec(tmp_path / "b", users=400), progress=None)
    c = simulate(_spec(tmp_path / "c", users=400, seed=4), progress=None)
    ta, tb, tc = (_read_all(tmp_path / k) for k in "abc")
    assert ta.equals(tb)
    assert a["channel_stats"] == b["channel_stats"] and a["parameters"] == b["parameters"]
    assert not ta.equals(tc) and c["parameters"] != a["parameters"]


def test_empirical_rates_match_true_rates(generated: tuple[SimulateSpec, dict[str, Any], pa.Table]) -> None:
    spec, meta, tab = generated
    ch = np.array([spec.channels.index(c) for c in tab.column("channel").to_pylist()])
    gain = tab.column("gain").to_numpy()
    true_p = np.stack([tab.column(f"true_p{i}").to_numpy() for i in range(len(spec.channels))], axis=1)
    p = true_p[np.arange(len(ch)), ch].astype(np.float64)  # truth of the logged channel
    stats = meta["channel_stats"]
    for c in range(len(spec.channels)):
        m = ch == c
        assert abs(p[m].mean() - stats["true_rate"][c]) < 1e-5
        se = np.sqrt((p[m] * (1 - p[m])).sum()) / m.sum()
        assert abs(gain[m].mean() - p[m].mean()) < 4 * se, (c, gain[m].mean(), p[m].mean(), se)
        assert abs(stats["true_rate"][c] - stats["target_rate"][c]) < 0.15 * stats["target_rate"][c]
    assert abs(meta["true_rate"] - spec.base_rate) < 0.15 * spec.base_rate


def test_propensities_match_channel_frequencies(generated: tuple[SimulateSpec, dict[str, Any], pa.Table]) -> None:
    spec, _, tab = generated
    sim = Simulator(spec)
    ch = np.array([spec.channels.index(c) for c in tab.column("channel").to_pylist()])
    x = np.stack([tab.column(f"f{i}").to_numpy() for i in range(spec.n_features)], axis=1).astype(np.float64)
    pi = sim.logging_probs(x)  # (N, C)
    assert np.allclose(tab.column("propensity").to_numpy(), pi[np.arange(len(ch)), ch], atol=1e-4)
    for c in range(len(spec.channels)):  # calibration per context bucket (deciles of pi_c)
        edges = np.quantile(pi[:, c], np.linspace(0, 1, 11))
        bucket = np.clip(np.searchsorted(edges, pi[:, c], side="right") - 1, 0, 9)
        for b in range(10):
            m = bucket == b
            se = np.sqrt((pi[m, c] * (1 - pi[m, c])).sum()) / m.sum()
            assert abs((ch[m] == c).mean() - pi[m, c].mean()) < 4.5 * se + 1e-3, (c, b)


def test_mean_journey_length(generated: tuple[SimulateSpec, dict[str, Any], pa.Table]) -> None:
    spec, meta, tab = generated
    _, counts = np.unique(tab.column("user_id").to_numpy(zero_copy_only=False), return_counts=True)
    assert counts.min() >= 2
    se = counts.std() / np.sqrt(len(counts))
    assert abs(counts.mean() - spec.mean_steps) < 4 * se
    assert abs(meta["mean_length"] - counts.mean()) < 1e-9


def test_shards_bounded_and_users_not_split(tmp_path: Path) -> None:
    meta = simulate(_spec(tmp_path / "s", users=600, shard_steps=1000), progress=None, block_users=150)
    assert len(meta["shards"]) >= 6
    seen: set[str] = set()
    for s in meta["shards"]:
        t = pq.read_table(tmp_path / "s" / s["path"])
        assert t.num_rows == s["steps"] <= 1000
        users = set(t.column("user_id").to_pylist())
        assert len(users) == s["users"] and not users & seen
        seen |= users
    assert len(seen) == 600
    # re-running into the same output replaces the old shards
    meta2 = simulate(_spec(tmp_path / "s", users=100, shard_steps=1000), progress=None)
    assert sorted(p.name for p in (tmp_path / "s").glob("part-*.parquet")) == [s["path"] for s in meta2["shards"]]


def test_memory_does_not_grow_with_users(tmp_path: Path) -> None:
    def peak(users: int) -> int:
        spec = _spec(tmp_path / f"m{users}", users=users, mean_steps=8.0, shard_steps=5000)
        tracemalloc.start()
        simulate(spec, progress=None, block_users=500)
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    peak(200)  # warm-up: lazy imports and caches are not what is measured
    small, large = peak(1500), peak(6000)
    assert large < 1.3 * small, (small, large)


def test_oracle_beats_logging_within_budget() -> None:
    sim = Simulator(SimulateSpec(output="unused", mean_steps=10.0, seed=1))
    n, budget = 3000, 3000 * 10 * 0.3  # about 15% of the steps of the mean cost 2
    res = {name: run_online(sim, pol, n, budget, seed=5)
           for name, pol in (("oracle", oracle_policy(sim)), ("observable", observable_oracle_policy(sim, n)),
                             ("logging", logging_policy(sim)), ("random", random_policy(sim)))}
    for r in res.values():
        assert r["spend"]["value"] <= budget + 1e-9
        assert r["spend"]["value"] > 0.9 * budget  # pacing spends (almost) all of it
        assert r["served_steps"] < r["steps"]
    assert res["oracle"]["expected_reward"]["ci95"][0] > res["logging"]["expected_reward"]["ci95"][1]
    assert res["oracle"]["roi_expected"]["ci95"][0] > res["logging"]["roi_expected"]["ci95"][1]
    # what a learner can see lies between: above the logger, below the full oracle
    v = {k: r["expected_reward"]["value"] for k, r in res.items()}
    assert v["oracle"] > v["observable"] > res["logging"]["expected_reward"]["ci95"][1], v
    assert res["oracle"]["penalty"]["mean"] > 0 and res["logging"]["penalty"] is None
    lo, hi = res["oracle"]["expected_reward"]["ci95"]
    assert lo <= res["oracle"]["expected_reward"]["value"] <= hi


@pytest.mark.parametrize("budget", [0.0, 7.5, 500.0, 1e9])
def test_spend_never_exceeds_budget(budget: float) -> None:
    sim = Simulator(SimulateSpec(output="unused", mean_steps=6.0, seed=2), calibration_users=1000)
    seen_hist = []

    def pol(obs: Any) -> tuple[np.ndarray, np.ndarray]:
        h = obs.history()
        assert h["state"].shape == (len(obs.user), obs.t + 1, 3 + sim.n_features)
        seen_hist.append(obs.t)
        return oracle_policy(sim)(obs)

    r = run_online(sim, pol, 300, budget, seed=0)
    assert r["spend"]["value"] <= budget + 1e-9
    if budget == 0:
        assert r["served_steps"] == 0 and r["expected_reward"]["value"] == 0
    if budget == 1e9:
        assert r["served_steps"] == r["steps"]
    assert seen_hist == list(range(len(seen_hist)))


def test_true_policy_value_of_logging_policy_matches_logged_rewards(generated: tuple[SimulateSpec, dict[str, Any], pa.Table]) -> None:
    spec, meta, _ = generated
    sim = Simulator(spec)
    journeys = list(read_journeys(spec.output))
    assert len(journeys) == spec.users and journeys[0]["true_p"].shape[1] == len(spec.channels)
    v = true_policy_value(sim, lambda j: sim.logging_probs(np.broadcast_to(j["user_features"], (len(j["channel"]), spec.n_features)).astype(np.float64)), journeys)
    mean_gain = float(np.concatenate([j["gain"] for j in journeys]).mean())
    assert v["ci95"][0] - 0.005 <= mean_gain <= v["ci95"][1] + 0.005
    best = true_policy_value(sim, lambda j: np.eye(len(spec.channels))[np.argmax(j["true_p"], axis=1)], journeys)
    assert best["value"] > v["value"]


def test_ope_estimates_recover_the_simulators_true_value(generated: tuple[SimulateSpec, dict[str, Any], pa.Table]) -> None:
    """IPS/SNIPS/DR of a target policy unlike the logger, from the logged propensities, against the
    response model's truth: unbiased estimators' 95% intervals hold it; a wrong reward model (DM
    with zero predictions) does not."""
    from mtorl.evaluation.ope import off_policy_estimates
    from mtorl.evaluation.predictions import Predictions

    spec, _, _ = generated
    sim = Simulator(spec)
    journeys = list(read_journeys(spec.output))
    C = len(spec.channels)
    lens = [len(j["channel"]) for j in journeys]
    n = sum(lens)
    tp = np.concatenate([j["true_p"] for j in journeys]).astype(np.float64)
    # target: 70% on the channel with the largest cost-free feature score, 30% uniform (full support)
    pi = np.full((n, C), 0.3 / C)
    pi[np.arange(n), np.concatenate([np.full(len(j["channel"]), int(np.argmax(j["user_features"][:C]))) for j in journeys])] += 0.7
    truth = true_policy_value(sim, lambda j: j["pi"], ({"true_p": tp[a:b], "pi": pi[a:b]} for a, b in
                                                          zip(np.cumsum([0] + lens[:-1]), np.cumsum(lens))))
    cat = lambda k: np.concatenate([j[k] for j in journeys])  # noqa: E731
    p = Predictions(user=np.repeat(np.arange(len(journeys)), lens), t=np.concatenate([np.arange(m) for m in lens]),
                    channel=cat("channel"), gain=cat("gain"), cost=cat("cost"), reward=cat("gain"), propensity=cat("propensity"),
                    action_probs=pi, reward_pred=np.zeros((n, C)), channels=list(spec.channels))
    est = off_policy_estimates(p, pi, p.propensity, n_boot=200, seed=0)
    err = ope_error({k: {"value": est[k]["value"], "ci95": [est[k]["ci_low"], est[k]["ci_high"]]} for k in ("ips", "snips", "dr", "dm")},
                    truth["value"])
    assert abs(truth["value"] - float(p.gain.mean())) > 0.005  # the target really differs from the logger
    for k in ("ips", "snips", "dr"):
        assert err[k]["covered"] == 1.0 and err[k]["rel_error"] < 0.1, (k, err[k], truth["value"])
    assert err["dm"]["covered"] == 0.0 and err["dm"]["estimate"] == 0.0


def test_ope_error_hand_computed() -> None:
    err = ope_error({"ips": 0.12, "dm": {"value": 0.08, "ci95": [0.07, 0.09]}}, 0.1)
    assert err["ips"]["abs_error"] == pytest.approx(0.02) and err["ips"]["rel_error"] == pytest.approx(0.2)
    assert err["dm"]["abs_error"] == pytest.approx(0.02) and err["dm"]["covered"] == 0.0


def test_dataset_stats_hand_computed() -> None:
    j = [{"channel": np.array([0, 1, 1]), "gain": np.array([1.0, 0.0, 1.0])},
         {"channel": np.array([2, 2, 0, 0, 1]), "gain": np.array([0.0, 0.0, 0.0, 1.0, 0.0])}]
    s = dataset_stats(j)
    assert s["channel_share"] == pytest.approx([3 / 8, 3 / 8, 2 / 8])
    assert s["channel_rate"] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert s["mean_length"] == 4.0 and s["length_var"] == 1.0 and "channel_cost" not in s


def _prepared_dataset(root: Path, rng: np.random.Generator) -> tuple[list[float], list[float], float]:
    """A tiny prepared dataset (manifest + one train shard in the documented layout) with known stats."""
    shares, rates, costs = [0.6, 0.3, 0.1], [0.03, 0.1, 0.3], [0.5, 1.0, 4.0]
    lengths = 2 + rng.poisson(6.0, 3000)
    rows: dict[str, list[Any]] = {"user_id": [], "length": [], "channel": [], "gain": [], "cost": []}
    for u, n in enumerate(lengths):
        ch = rng.choice(3, n, p=shares)
        rows["user_id"].append(f"u{u}")
        rows["length"].append(int(n))
        rows["channel"].append(ch.tolist())
        rows["gain"].append((rng.random(n) < np.asarray(rates)[ch]).astype(float).tolist())
        rows["cost"].append(np.asarray(costs)[ch].tolist())
    table = pa.table({"user_id": pa.array(rows["user_id"]), "length": pa.array(rows["length"], pa.int32()),
                      "channel": pa.array(rows["channel"], pa.list_(pa.int16())),
                      "gain": pa.array(rows["gain"], pa.list_(pa.float32())),
                      "cost": pa.array(rows["cost"], pa.list_(pa.float32()))})
    (root / "v1" / "train").mkdir(parents=True)
    pq.write_table(table, root / "v1" / "train" / "part-00000.parquet")
    steps = int(lengths.sum())
    manifest = {"schema_version": 1, "version": "v1", "step_features": [], "user_features": [], "penalty": 0.0,
                "normalization": {"mean": [], "std": []}, "reward_norm": {"min": 0.0, "max": 1.0},
                "channels": ["a", "b", "c"], "splits": {"train": {"users": len(lengths), "steps": steps,
                "shards": [{"path": "v1/train/part-00000.parquet", "users": len(lengths), "steps": steps}]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return shares, rates, float(lengths.mean())


def test_calibration_hits_target_shares_rates_lengths(tmp_path: Path) -> None:
    shares, rates, mean_len = _prepared_dataset(tmp_path / "ds", np.random.default_rng(0))
    manifest = load_manifest(str(tmp_path / "ds"))
    assert calibrate(manifest)["mean_steps"] == pytest.approx(mean_len)  # manifest only
    meta = simulate(_spec(tmp_path / "sim", users=3000, calibrate_from=str(tmp_path / "ds")), progress=None)
    over = meta["calibration"]["overrides"]
    assert over["channels"] == ["a", "b", "c"] and over["channel_costs"] == pytest.approx([0.5, 1.0, 4.0])
    got = dataset_stats(({"channel": j["channel"], "gain": j["gain"]} for j in read_journeys(str(tmp_path / "sim"))), 3)
    assert got["channel_share"] == pytest.approx(shares, abs=0.03)
    assert got["channel_rate"] == pytest.approx(rates, rel=0.2)
    assert got["mean_length"] == pytest.approx(mean_len, rel=0.05)
    assert got["length_var"] < 2.5 * mean_len  # Poisson-like lengths, not geometric


def test_spec_lists_must_match_channels() -> None:
    with pytest.raises(ValueError, match="channel_rates"):
        Simulator(SimulateSpec(output="x", channel_rates=[0.1, 0.2]))


def test_prepare_takes_the_mapping_of_simulated_logs(generated: tuple[SimulateSpec, dict[str, Any], pa.Table], tmp_path: Path) -> None:
    """`source: journeys` on a simulation output needs no `journeys:` block: the sidecar's mapping is used."""
    from mtorl.data.prepare import prepare
    from mtorl.spec import make_job

    spec, meta, _ = generated
    man = prepare(make_job("PrepareJob", "p", {"source": "journeys", "input": spec.output, "output": str(tmp_path / "ds")}).spec,
                  progress=lambda *_: None)
    assert man.step_features == list(meta["journeys"]["numeric_features"])
    assert man.user_features == list(meta["journeys"]["user_features"])
    assert man.journeys_format["propensity_col"] == "propensity"
    assert man.rows_read == meta["steps"]


def test_served_history_drops_unserved_steps_and_carries_their_time() -> None:
    from mtorl.sim.closed_loop import served_history

    # one user at step t = 3: steps 0 and 2 served (channels 1, 0; outcomes 1, 0), step 1 not served
    gaps = np.array([0.0, 2.0, 3.0, 4.0])                     # hours since the previous opportunity
    state = np.zeros((1, 4, 2))
    state[0, :, 0] = np.log1p(gaps)                           # recency column
    state[0, :, 1] = [10, 11, 12, 13]                         # a marker per step
    h = {"state": state, "prev_channel": np.array([[-1, 1, -1, 0]]), "prev_reward": np.array([[0.0, 1.0, 0.0, 0.0]])}
    st, pc, pr, n = served_history(h, recency_col=0)
    assert n.tolist() == [3] and st[0, :, 1].tolist() == [10, 12, 13]
    assert np.expm1(st[0, :, 0]) == pytest.approx([0.0, 5.0, 4.0])   # step 2 is 2 + 3 h after step 0
    assert pc[0].tolist() == [-1, 1, 0] and pr[0].tolist() == [0.0, 1.0, 0.0]
