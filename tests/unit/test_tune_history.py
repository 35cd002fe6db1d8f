"""The per-epoch history a restored sweep replays to Tune for a trial that already ran."""

from __future__ import annotations

import json
from pathlib import Path

from mtorl.tuning.sweep import previous_history


def _checkpoint(run: Path, name: str, epoch: int) -> None:
    d = run / name
    d.mkdir(parents=True)
    history = [{"epoch": e, "val/loss": 1.0 - 0.1 * e} for e in range(epoch + 1)]
    manifest = {"schema_version": 1, "version": "v1", "channels": ["a", "b"], "step_features": [], "user_features": [],
                "normalization": {"mean": [], "std": []}, "reward_norm": {"min": 0.0, "max": 1.0}, "penalty": 0.0,
                "splits": {}}
    meta = {"epoch": epoch, "history": history, "spec": {}, "manifest": manifest, "sha256": {},
            "mtorl_version": "0.1.0"}
    (d / "meta.json").write_text(json.dumps(meta))


def test_history_comes_from_the_latest_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "trial"
    # kept checkpoints are named by time, not epoch; the latest epoch wins whatever the order
    _checkpoint(run, "checkpoint_b", 2)
    _checkpoint(run, "checkpoint_a", 0)
    _checkpoint(run, "checkpoint_c", 1)
    (run / "best.json").write_text("{}")
    hist = previous_history(str(run))
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    assert hist[-1]["val/loss"] == 0.8


def test_a_fresh_trial_has_no_history(tmp_path: Path) -> None:
    assert previous_history(str(tmp_path / "missing")) == []
    (tmp_path / "empty").mkdir()
    assert previous_history(str(tmp_path / "empty")) == []
