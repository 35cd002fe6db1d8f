"""Streaming evaluation's parts against the in-memory ones: batches of users, train statistics, metric sums,
an ensemble's reward spread, and a corrupt or missing shard named in one line (local files, no Ray)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from mtorl.data.errors import DataError
from mtorl.data.manifest import load_manifest
from mtorl.evaluation.heuristics import HistoryPrior
from mtorl.evaluation.metrics import channel_metrics, reward_metrics
from mtorl.evaluation.predictions import Predictions, outcome
from mtorl.evaluation.run import read_split, to_predictions
from mtorl.evaluation.streaming import (MetricSums, TrainStats, behaviour_features, split_batches, split_tables,
                                       step_columns)
from tests.fixtures.compare import assert_close
from tests.fixtures.shards import flip_a_byte, remove_a_shard, small_sharded_dataset


@pytest.fixture
def dataset(tmp_path: Path) -> str:
    return small_sharded_dataset(tmp_path)


def test_batches_of_whole_users_are_the_split_in_order(dataset: str) -> None:
    m = load_manifest(dataset)
    whole = read_split(dataset, "train", m)
    batches = list(split_batches(dataset, m, "train", batch_steps=30))
    assert len(batches) > len(m.splits["train"].shards) > 1
    flat = [j for b in batches for j in b]
    assert [j.user_id for j in flat] == [j.user_id for j in whole]
    for a, b in zip(flat, whole):
        np.testing.assert_array_equal(a.channel, b.channel)
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.reward, b.reward)


@pytest.mark.parametrize("max_behaviour", [10**6, 57])
def test_train_stats_equal_the_in_memory_prior_and_behaviour_rows(dataset: str, max_behaviour: int) -> None:
    m = load_manifest(dataset)
    C = len(m.channels)
    train = read_split(dataset, "train", m)
    tp = to_predictions(train, m.channels, m.gain_binary, "train")
    ts = TrainStats(C, m.gain_binary, m.splits["train"].steps, max_behaviour, seed=3)
    light = TrainStats(C, m.gain_binary, m.splits["train"].steps, max_behaviour, seed=3, collect=False)
    for b in split_batches(dataset, m, "train", batch_steps=25):
        ts.add(b)
        light.add(b)
    columns = TrainStats(C, m.gain_binary, m.splits["train"].steps, max_behaviour, collect=False)
    for uri, table in split_tables(dataset, m, "train"):
        columns.add_steps(*step_columns(uri, table, m, m.gain_binary))
    np.testing.assert_array_equal(columns.prior().channel_prior, ts.prior().channel_prior)
    assert columns.prior().rate == pytest.approx(ts.prior().rate, rel=1e-12)
    np.testing.assert_array_equal(light.prior().channel_prior, ts.prior().channel_prior)
    assert light.prior().rate == ts.prior().rate
    ref = HistoryPrior.fit(tp.channel, outcome(tp), C)
    got = ts.prior()
    np.testing.assert_allclose(got.channel_prior, ref.channel_prior, rtol=1e-12)
    assert got.rate == pytest.approx(ref.rate, rel=1e-12)
    X, c = behaviour_features(train, C), tp.channel     # what the in-memory path fits on
    if len(c) > max_behaviour:
        keep = np.random.default_rng(3).choice(len(c), max_behaviour, replace=False)
        X, c = X[keep], c[keep]
    gx, gc = ts.behaviour_rows("ds")
    np.testing.assert_array_equal(gx, X)
    np.testing.assert_array_equal(gc, c)


def _random_predictions(rng: np.random.Generator, n_users: int, C: int, binary: bool) -> Predictions:
    lengths = rng.integers(1, 9, n_users)
    n = int(lengths.sum())
    ap = rng.dirichlet(np.ones(C), n)
    return Predictions(user=np.repeat(np.arange(n_users), lengths), t=np.concatenate([np.arange(k) for k in lengths]),
                       channel=rng.integers(0, C - 1, n),  # the last channel is never logged: sklearn's label set
                       gain=(rng.random(n) < 0.3).astype(float) if binary else rng.random(n), cost=rng.random(n),
                       reward=rng.random(n), propensity=np.full(n, 1.0 / C), action_probs=ap,
                       reward_pred=rng.random((n, C)), channels=[f"c{i}" for i in range(C)], binary=binary)


@pytest.mark.parametrize("binary", [True, False])
def test_metric_sums_over_batches_equal_the_whole_split_metrics(binary: bool) -> None:
    rng = np.random.default_rng(0)
    parts = [_random_predictions(rng, int(k), 4, binary) for k in (30, 1, 55, 12)]
    whole = Predictions.concat(parts, renumber_users=True)
    sums = MetricSums(4, binary)
    for p in parts:
        sums.add(p)
    result = sums.apply({"channel": {}, "reward": {}})
    ch, rw = channel_metrics(whole), reward_metrics(whole)
    for k in ("accuracy", "macro_f1", "macro_precision", "macro_recall"):
        assert result["channel"][k] == pytest.approx(ch[k], rel=1e-12, abs=1e-15), k
    keys = ("logloss", "brier", "ece") if binary else ("mse", "mae")
    for k in (*keys, "mean_pred", "mean_outcome"):
        assert result["reward"][k] == pytest.approx(rw[k], rel=1e-9), k
    if binary:
        assert result["reward"]["reliability"]["counts"] == rw["reliability"]["counts"]
        np.testing.assert_allclose(np.array(result["reward"]["reliability"]["frac_pos"], dtype=float),
                                   np.array(rw["reliability"]["frac_pos"], dtype=float), rtol=1e-12)
    assert result["n_steps"] == whole.n_steps and result["n_users"] == whole.n_users
    assert result["base_rate"] == pytest.approx(float(outcome(whole).mean()), rel=1e-12)


def test_an_ensemble_decides_on_its_spread_alike_streamed_or_in_memory(tmp_path: Path) -> None:
    """An ensemble of two untrained members evaluated with decision.ensemble_pessimism = 1: the in-memory and the
    streaming evaluations give the same report (the members' spread rides with the predictions of every batch),
    and the spread reaches the decision layer (beta_e = 0 gives the ensemble row other budget points and OPE)."""
    from mtorl.evaluation.run import run_evaluate
    from mtorl.spec import make_job
    from mtorl.training.ensemble import combine_runs
    from tests.fixtures.checkpoints import untrained_run

    ds = small_sharded_dataset(tmp_path, users=400)  # the test split in two shards: two streamed batches
    man = load_manifest(ds).model_dump(mode="json")
    combine_runs([untrained_run(tmp_path, f"s{k}", k, manifest=man) for k in range(2)], str(tmp_path / "ens"),
                 progress=lambda m: None)
    runs = {"memory": ({"stream_min_steps": 10**12}, 1.0), "stream": ({"stream_min_steps": 0}, 1.0),
            "beta0": ({"stream_min_steps": 10**12}, 0.0)}
    m, res = {}, {}
    for name, (over, beta_e) in runs.items():
        spec = make_job("EvaluateJob", f"ev-{name}", {
            "checkpoint": str(tmp_path / "ens"), "data": ds, "output": str(tmp_path / name), "bootstrap": 20,
            "decision": {"support_threshold": 0.0, "ensemble_pessimism": beta_e}, **over}).spec
        res[name] = run_evaluate(spec, progress=lambda *a: None)
        m[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert res["memory"]["mode"].startswith("in memory") and res["stream"]["mode"].startswith("streaming")
    assert_close(m["memory"], m["stream"])
    assert (tmp_path / "memory" / "report.md").read_text() == (tmp_path / "stream" / "report.md").read_text()
    assert "ensemble pessimism beta_e = 1" in (tmp_path / "memory" / "report.md").read_text()
    ens, zero = m["memory"]["compare"]["mtorl"], m["beta0"]["compare"]["mtorl"]
    assert ens["budget"] != zero["budget"] and ens["ope"]["dr"] != zero["ope"]["dr"]
    assert m["memory"]["compare"]["history"] == m["beta0"]["compare"]["history"]  # a heuristic has no spread


def test_the_reward_spread_is_concatenated_with_the_batches() -> None:
    rng = np.random.default_rng(1)
    parts = [_random_predictions(rng, k, 3, True) for k in (4, 7)]
    spread = [dataclasses.replace(p, reward_std=rng.random((p.n_steps, 3))) for p in parts]
    whole = Predictions.concat(spread, renumber_users=True)
    assert whole.reward_std is not None
    np.testing.assert_array_equal(whole.reward_std, np.concatenate([p.reward_std for p in spread]))
    assert Predictions.concat(parts).reward_std is None
    with pytest.raises(ValueError, match="reward_std"):
        Predictions.concat([spread[0], parts[1]])
    with pytest.raises(ValueError, match=r"reward_std: expected shape"):
        dataclasses.replace(parts[0], reward_std=np.zeros((parts[0].n_steps, 2)))
    with pytest.raises(ValueError, match=r"reward_std: must be finite and >= 0"):
        dataclasses.replace(parts[0], reward_std=-np.ones((parts[0].n_steps, 3)))


def test_a_corrupt_shard_is_one_line_naming_it(dataset: str) -> None:
    m = load_manifest(dataset)
    shard = flip_a_byte(dataset, m, "test", -1)
    with pytest.raises(DataError) as e:
        list(split_batches(dataset, m, "test"))
    assert str(e.value).startswith(f"{shard}: sha256 mismatch") and "\n" not in str(e.value)


def test_a_missing_shard_is_one_line_naming_it(dataset: str) -> None:
    m = load_manifest(dataset)
    shard = remove_a_shard(dataset, m, "train", 1)
    with pytest.raises(DataError) as e:
        list(split_batches(dataset, m, "train"))
    assert str(e.value) == f"{shard}: shard listed in the manifest is missing"
