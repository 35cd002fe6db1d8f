"""Streaming evaluation's parts against the in-memory ones: batches of users, train statistics, metric sums,
and a corrupt or missing shard named in one line (local files, no Ray)."""

from __future__ import annotations

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
