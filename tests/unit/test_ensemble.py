"""Ensemble checkpoints (`mtorl ensemble`): an ensemble of one predicts what its member does, the
prediction of K is the members' mean, and a member that can't join (or a malformed ensemble) is one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mtorl.cli import main as cli_main
from mtorl.models import build_model
from mtorl.models.ensemble import Ensemble, predict_spread
from mtorl.serving.predictor import Predictor
from mtorl.spec import ModelSpec
from mtorl.training.checkpoint import BEST_FILE, CheckpointError, load_checkpoint, write_checkpoint_dir
from mtorl.training.ensemble import ENSEMBLE_DIR, combine_runs

MANIFEST = {"schema_version": 1, "version": "v1", "channels": ["search", "video"], "step_features": ["x", "y"],
            "user_features": [], "normalization": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
            "reward_norm": {"min": 0.0, "max": 1.0}, "penalty": 0.0, "splits": {}}
MODEL = {"name": "mtorl", "hidden": 8, "tcn": {"levels": 1, "kernel_size": 2}, "attention": {"heads": 2},
         "decoder_hidden": 8}
ARGS = {"state_dim": 2, "n_channels": 2, "binary": True}


def _run(root: Path, name: str, seed: int, model: dict[str, Any] = MODEL, sha: str = "data-v1") -> str:
    """A finished run with one checkpoint and its best.json, the weights drawn with ``seed``."""
    torch.manual_seed(seed)
    net = build_model(ModelSpec.model_validate(model), **ARGS)
    run = root / name
    ck = write_checkpoint_dir(run / "checkpoint_epoch_000000", net, None, {
        "spec": {"kind": "TrainJob", "spec": {"model": model, "trainer": {"seed": seed}}},
        "model_args": ARGS, "manifest": MANIFEST, "manifest_sha256": sha, "epoch": 0,
        "metrics": {"val/select_rate@budget": 0.1 + seed}})
    (run / BEST_FILE).write_text(json.dumps({"checkpoint": str(ck), "metric": "m", "value": 0}))
    return str(run)


def _inputs(B: int = 5, T: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(3)
    return (g.normal(size=(B, T, 2)).astype(np.float32), g.integers(-1, 2, size=(B, T)),
            g.random((B, T)).astype(np.float32))


def test_ensemble_of_one_predicts_what_its_member_does(tmp_path: Path) -> None:
    member = _run(tmp_path, "a", 0)
    ens = combine_runs([member], str(tmp_path / "ens1"), progress=lambda m: None)
    assert ens == str(tmp_path / "ens1" / ENSEMBLE_DIR)
    p_ens, p_one = Predictor.from_checkpoint(str(tmp_path / "ens1")), Predictor.from_checkpoint(member)
    assert isinstance(p_ens.model, Ensemble) and len(p_ens.model) == 1 and p_ens.ensemble_size == 1
    a_e, r_e = p_ens.predict_last(*_inputs())
    a_1, r_1 = p_one.predict_last(*_inputs())
    np.testing.assert_array_equal(a_e, a_1)
    np.testing.assert_array_equal(r_e, r_1)


def test_ensemble_predicts_the_members_mean_and_spread(tmp_path: Path) -> None:
    runs = [_run(tmp_path, f"s{k}", k) for k in range(3)]
    combine_runs(runs, str(tmp_path / "ens"), progress=lambda m: None)
    p = Predictor.from_checkpoint(str(tmp_path / "ens"))
    meta = p.meta.ensemble
    assert meta is not None and [m.seed for m in meta.members] == [0, 1, 2] and p.name == "mtorl"
    assert [m.checkpoint for m in meta.members] == [load_checkpoint(r).uri for r in runs]
    outs = [Predictor.from_checkpoint(r).predict_last(*_inputs()) for r in runs]
    probs, reward = p.predict_last(*_inputs())
    np.testing.assert_allclose(probs, np.mean([o[0] for o in outs], axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(reward, np.mean([o[1] for o in outs], axis=0), rtol=1e-6, atol=1e-7)
    assert not np.allclose(outs[0][1], outs[1][1])  # the members do differ: the mean is not trivially one of them
    # the members' spread: population std of the reward heads, zeros for a single model
    from mtorl.models import Batch

    s, c, r = _inputs()
    batch = Batch.from_numpy({"state": s, "prev_channel": c.astype(np.int64), "prev_reward": r,
                              "mask": np.ones(c.shape, dtype=bool)})
    _, _, sd = predict_spread(p.model, batch)
    np.testing.assert_allclose(sd[:, -1].numpy(), np.std([o[1] for o in outs], axis=0), rtol=1e-5, atol=1e-6)
    one = Predictor.from_checkpoint(runs[0]).model
    assert torch.count_nonzero(predict_spread(one, batch)[2]) == 0


@pytest.mark.parametrize("bad, match", [
    ("spec", r"^member 1 \(.*b/checkpoint_epoch_000000\): model spec differs from member 0's"),
    ("data", r"^member 1 \(.*\): trained on another dataset than member 0"),
    ("same", r"^member 1 \(.*\): the same checkpoint as member 0$"),
    ("weights", r"^.*b/checkpoint_epoch_000000/model.safetensors: checksum mismatch"),
])
def test_a_member_that_cannot_join_is_one_line(tmp_path: Path, bad: str, match: str) -> None:
    a = _run(tmp_path, "a", 0)
    b = {"spec": lambda: _run(tmp_path, "b", 1, model={**MODEL, "hidden": 16}),
         "data": lambda: _run(tmp_path, "b", 1, sha="data-v2"),
         "same": lambda: a}[bad]() if bad != "weights" else _run(tmp_path, "b", 1)
    if bad == "weights":
        f = Path(b) / "checkpoint_epoch_000000" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=match):
        combine_runs([a, b], str(tmp_path / "ens"), progress=lambda m: None)
    assert not (tmp_path / "ens" / BEST_FILE).exists()


def test_malformed_ensemble_checkpoint_is_one_line(tmp_path: Path) -> None:
    """meta.json lists three members, the weights hold two: refused on load, naming the file."""
    nets = [build_model(ModelSpec.model_validate(MODEL), **ARGS) for _ in range(2)]
    member = {"checkpoint": "x", "model_sha256": "0", "seed": 0}
    d = write_checkpoint_dir(tmp_path / "ck", Ensemble(nets), None, {
        "spec": {"kind": "TrainJob", "spec": {"model": MODEL}}, "model_args": ARGS, "manifest": MANIFEST,
        "ensemble": {"members": [member] * 3}})
    with pytest.raises(CheckpointError, match=rf"^{d}/model.safetensors: weights do not fit an ensemble of 3 \("):
        Predictor.from_checkpoint(str(d))


def test_cli_rerun_is_a_noop_and_another_run_is_refused_in_one_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _run(tmp_path, "a", 0), _run(tmp_path, "b", 1)
    assert cli_main(["ensemble", a, b, "--out", str(tmp_path / "ens")]) == 0
    first = (tmp_path / "ens" / ENSEMBLE_DIR / "model.safetensors").stat().st_mtime_ns
    assert cli_main(["ensemble", a, b, "--out", str(tmp_path / "ens")]) == 0       # the same members: nothing to do
    assert (tmp_path / "ens" / ENSEMBLE_DIR / "model.safetensors").stat().st_mtime_ns == first
    capsys.readouterr()
    assert cli_main(["ensemble", a, "--out", str(tmp_path / "ens")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'ens'}: already holds another run ({BEST_FILE}); choose another --out"]
