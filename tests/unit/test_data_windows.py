"""Pure numpy CMDP maths against hand-computed arrays (no Ray)."""

import numpy as np
import pyarrow as pa
import pytest

from mtorl.data.manifest import Manifest
from mtorl.data.windows import Journey, compute_reward, journeys_from_table, make_windows, normalise_state, pad_journeys

BASE = {"schema_version": 1, "version": "v1", "channels": ["x", "y", "z"], "splits": {},
        "penalty": 0.5, "reward_norm": {"min": -1.0, "max": 1.0}, "step_features": ["a"], "user_features": ["u"],
        "normalization": {"mean": [1.0, 2.0], "std": [2.0, 4.0]}}
MANIFEST = Manifest.model_validate(BASE)


def _journey(uid: str, T: int, base: int) -> Journey:
    ch = np.arange(T, dtype=np.int64) % 3
    r = (base + np.arange(T)).astype(np.float32) / 10
    state = np.stack([base + np.arange(T), -(base + np.arange(T))], axis=1).astype(np.float32)  # (T, 2)
    return Journey(uid, ch, r * 2, np.ones(T, np.float32), np.full(T, np.nan, np.float32), state, r)


def test_compute_reward_formula_and_clip() -> None:
    g = np.array([1.0, 0.0, 3.0, -5.0])
    w = np.array([2.0, 0.0, 0.0, 0.0])
    # (g - 0.5 w + 1) / 2, clipped to [0, 1]
    np.testing.assert_allclose(compute_reward(g, w, MANIFEST), [0.5, 0.5, 1.0, 0.0])
    assert compute_reward(g, w, MANIFEST).dtype == np.float32


def test_compute_reward_degenerate_range() -> None:
    m = Manifest.model_validate({**BASE, "penalty": 0.0, "reward_norm": {"min": 1.0, "max": 1.0}})
    np.testing.assert_allclose(compute_reward(np.array([1.0, 1.5]), np.zeros(2), m), [0.0, 0.5])


def test_normalise_state() -> None:
    x = normalise_state(np.array([[3.0], [5.0]]), np.array([6.0]), MANIFEST)
    np.testing.assert_allclose(x, [[1.0, 1.0], [2.0, 1.0]])
    assert x.shape == (2, 2) and x.dtype == np.float32


def test_make_windows_hand_computed() -> None:
    j0, j1 = _journey("a", 5, 0), _journey("b", 2, 100)
    w = make_windows([j0, j1], length=3)
    # j0 -> windows at 0 and 3 (the second half-padded); j1 -> one padded window
    assert w["state"].shape == (3, 3, 2) and w["channel"].shape == (3, 3)
    np.testing.assert_array_equal(w["channel"], [[0, 1, 2], [0, 1, -1], [0, 1, -1]])
    np.testing.assert_array_equal(w["prev_channel"], [[-1, 0, 1], [2, 0, -1], [-1, 0, -1]])  # window 2 starts at t=3
    np.testing.assert_allclose(w["prev_reward"], [[0, 0.0, 0.1], [0.2, 0.3, 0], [0, 10.0, 0]], rtol=1e-6)
    np.testing.assert_allclose(w["reward"], [[0.0, 0.1, 0.2], [0.3, 0.4, 0], [10.0, 10.1, 0]], rtol=1e-6)
    np.testing.assert_array_equal(w["mask"], [[1, 1, 1], [1, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(w["done"], [[0, 0, 0], [0, 1, 0], [0, 1, 0]])
    np.testing.assert_allclose(w["state"][1, :, 0], [3, 4, 0])
    np.testing.assert_allclose(w["gain"][2], [20.0, 20.2, 0], rtol=1e-6)
    assert np.isnan(w["propensity"][0]).all() and (w["propensity"][1, 2] == 0)
    assert w["prev_channel"].dtype == np.int64 and w["done"].dtype == bool and w["state"].dtype == np.float32


def test_make_windows_stride() -> None:
    w = make_windows([_journey("a", 5, 0)], length=3, stride=1)
    # starts 0, 1, 2 (the window at 2 reaches the end): no tail-only windows
    np.testing.assert_array_equal(w["channel"], [[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    np.testing.assert_array_equal(w["prev_channel"][:, 0], [-1, 0, 1])
    assert w["done"].sum() == 1 and w["done"][2, 2]


def test_make_windows_empty() -> None:
    w = make_windows([], length=4, state_dim=7)
    assert w["state"].shape == (0, 4, 7) and w["mask"].shape == (0, 4)


def test_pad_journeys() -> None:
    p = pad_journeys([_journey("a", 2, 0), _journey("b", 4, 0)])
    assert p["state"].shape == (2, 4, 2)
    np.testing.assert_array_equal(p["mask"].sum(axis=1), [2, 4])
    np.testing.assert_array_equal(p["done"], [[0, 1, 0, 0], [0, 0, 0, 1]])


def test_journeys_from_table() -> None:
    t = pa.table({
        "user_id": ["x", "y"], "length": pa.array([2, 1], pa.int32()),
        "channel": pa.array([[1, 0], [2]], pa.list_(pa.int16())),
        "gain": [[1.0, 0.0], [1.0]], "cost": [[0.0, 2.0], [0.0]], "propensity": [[0.5, 0.5], [float("nan")]],
        "features": [[3.0, 5.0], [1.0]], "user_features": [[6.0], [2.0]],
    })
    js = journeys_from_table(t, MANIFEST)
    assert [j.user_id for j in js] == ["x", "y"] and [j.length for j in js] == [2, 1]
    np.testing.assert_allclose(js[0].state, [[1.0, 1.0], [2.0, 1.0]])
    np.testing.assert_allclose(js[0].reward, [1.0, 0.0])
    np.testing.assert_allclose(js[1].state, [[0.0, 0.0]])
    assert js[0].channel.dtype == np.int64
    # the same from a dict of columns (Ray numpy batches)
    d = {k: t.column(k).to_pylist() for k in t.column_names}
    d = {k: (np.array(v, dtype=object) if k != "user_id" else np.array(v)) for k, v in d.items()}
    js2 = journeys_from_table(d, MANIFEST)
    np.testing.assert_allclose(js2[0].state, js[0].state)


@pytest.mark.parametrize("length", [1, 2, 7])
def test_windows_cover_every_step_once(length: int) -> None:
    js = [_journey(str(i), T, i) for i, T in enumerate([1, 3, 7, 2])]
    w = make_windows(js, length=length)
    assert w["mask"].sum() == 13 and w["done"].sum() == 4
