"""Tampered checkpoints are refused with one line: edited meta.json, swapped weights with an updated digest,
NaN weights, missing keys, a pickle as optimizer state, best.json without its key."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from mtorl.training.checkpoint import (
    CHECKSUM_FILE,
    META_FILE,
    MODEL_FILE,
    OPTIM_FILE,
    CheckpointError,
    load_checkpoint,
    write_checkpoint_dir,
)


MANIFEST = {"schema_version": 1, "version": "v1", "channels": ["search", "video"], "step_features": ["x"],
            "user_features": [], "normalization": {"mean": [0.0], "std": [1.0]},
            "reward_norm": {"min": 0.0, "max": 1.0}, "penalty": 0.0, "splits": {}}


def _ckpt(d: Path, nan: bool = False) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    if nan:
        with torch.no_grad():
            model.weight[0, 0] = float("nan")
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return write_checkpoint_dir(
        d, model, opt, {"spec": {"kind": "TrainJob"}, "manifest": MANIFEST, "epoch": 1}
    )


def _edit_meta(d: Path, fn) -> None:  # type: ignore[no-untyped-def]
    meta = json.loads((d / META_FILE).read_text())
    fn(meta)
    (d / META_FILE).write_text(json.dumps(meta))


def test_intact_checkpoint_loads(tmp_path: Path) -> None:
    ck = load_checkpoint(str(_ckpt(tmp_path / "ck")), with_optimizer=True)
    assert ck.manifest.channels == ["search", "video"] and ck.optimizer_state is not None and ck.meta.epoch == 1
    sums = json.loads((tmp_path / "ck" / CHECKSUM_FILE).read_text())["files"]
    assert set(sums) == {META_FILE, MODEL_FILE, OPTIM_FILE}


def test_edited_channel_name_is_refused(tmp_path: Path) -> None:
    d = _ckpt(tmp_path / "ck")
    _edit_meta(d, lambda m: m["manifest"].update(channels=["search", "radio"]))
    with pytest.raises(CheckpointError, match=rf"^{d}/meta.json: checksum mismatch"):
        load_checkpoint(str(d))


def test_swapped_weights_with_updated_digest_in_meta_is_refused(tmp_path: Path) -> None:
    d, other = _ckpt(tmp_path / "ck"), _ckpt(tmp_path / "other", nan=False)
    torch.manual_seed(1)
    write_checkpoint_dir(other, torch.nn.Linear(3, 2), None, {"spec": {}, "manifest": MANIFEST})
    (d / MODEL_FILE).write_bytes((other / MODEL_FILE).read_bytes())
    new = json.loads((other / META_FILE).read_text())["sha256"][MODEL_FILE]
    _edit_meta(d, lambda m: m["sha256"].update({MODEL_FILE: new}))
    with pytest.raises(CheckpointError, match="meta.json: checksum mismatch"):
        load_checkpoint(str(d))


def test_altered_weights_are_refused(tmp_path: Path) -> None:
    d = _ckpt(tmp_path / "ck")
    data = bytearray((d / MODEL_FILE).read_bytes())
    data[-1] ^= 1
    (d / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{MODEL_FILE}: checksum mismatch"):
        load_checkpoint(str(d))


def test_missing_checksums_or_keys_or_bad_json(tmp_path: Path) -> None:
    d = _ckpt(tmp_path / "a")
    (d / CHECKSUM_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"no {CHECKSUM_FILE}"):
        load_checkpoint(str(d))
    d = _ckpt(tmp_path / "b")
    (d / CHECKSUM_FILE).write_text("[1]")
    with pytest.raises(CheckpointError, match="not a checksum file"):
        load_checkpoint(str(d))
    from mtorl.training.checkpoint import write_checksums

    for name, edit in (("c", lambda m: m.pop("manifest")), ("d", lambda m: m.pop("sha256"))):
        d = _ckpt(tmp_path / name)
        _edit_meta(d, edit)
        blobs = {n: (d / n).read_bytes() for n in (META_FILE, MODEL_FILE)}
        write_checksums(d, blobs)  # a consistent but incomplete checkpoint
        with pytest.raises(CheckpointError, match="meta.json: lacks"):
            load_checkpoint(str(d))


def test_nan_weights_are_refused(tmp_path: Path) -> None:
    d = _ckpt(tmp_path / "ck", nan=True)
    with pytest.raises(CheckpointError, match="tensor 'weight' holds NaN"):
        load_checkpoint(str(d))


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


def test_a_pickle_as_optimizer_state_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mtorl.training.checkpoint import write_checksums

    d = _ckpt(tmp_path / "ck")
    evil = pickle.dumps({"state": _Evil()}, protocol=2)
    (d / OPTIM_FILE).write_bytes(evil)
    _edit_meta(d, lambda m: m["sha256"].update({OPTIM_FILE: __import__("hashlib").sha256(evil).hexdigest()}))
    write_checksums(
        d, {n: (d / n).read_bytes() for n in (META_FILE, MODEL_FILE, OPTIM_FILE)}
    )  # a forger's full rewrite
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(d), with_optimizer=True)
    assert str(e.value) == f"{d}/{OPTIM_FILE}: refused: not plain tensor data (UnpicklingError)"
    assert "pwned" not in capsys.readouterr().out


def test_best_json_without_its_key(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.json").write_text(json.dumps({"metric": "val/loss"}))
    with pytest.raises(CheckpointError, match="best.json: no 'checkpoint' key"):
        load_checkpoint(str(run))


def test_an_uploaded_but_unregistered_checkpoint_is_removed_on_resume(tmp_path: Path) -> None:
    from mtorl.training.checkpoint import RAY_SNAPSHOT_FILE, remove_unregistered_checkpoints, unregistered_checkpoints

    run = tmp_path / "run"
    for name in (
        "checkpoint_2026-12-01_10-00-00.1",
        "checkpoint_2026-12-01_10-01-00.2",
        "checkpoint_2026-12-01_10-02-00.3",
    ):
        _ckpt(run / name)
    (run / RAY_SNAPSHOT_FILE).write_text(
        json.dumps(
            {
                "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_2026-12-01_10-00-00.1", "metrics": {}}],
                "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-12-01_10-01-00.2", "metrics": {}},
                "pending_training_results": [],
            }
        )
    )
    orphan = f"{run}/checkpoint_2026-12-01_10-02-00.3"
    assert unregistered_checkpoints(str(run)) == [orphan]
    assert remove_unregistered_checkpoints(str(run)) == [orphan]
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint_2026-12-01_10-00-00.1",
        "checkpoint_2026-12-01_10-01-00.2",
        RAY_SNAPSHOT_FILE,
    ]
    assert unregistered_checkpoints(str(tmp_path / "no-run")) == []


def test_a_consistent_meta_json_with_a_wrong_field_is_one_line(tmp_path: Path) -> None:
    from mtorl.training.checkpoint import write_checksums

    cases = (("e", lambda m: m.update(epoch="last"), r"meta\.json: field epoch: "),
             ("f", lambda m: m["manifest"].pop("channels"), r"meta\.json: field manifest\.channels: "))
    for name, edit, expect in cases:
        d = _ckpt(tmp_path / name)
        _edit_meta(d, edit)
        write_checksums(d, {n: (d / n).read_bytes() for n in (META_FILE, MODEL_FILE)})
        with pytest.raises(CheckpointError, match=expect) as e:
            load_checkpoint(str(d))
        assert "\n" not in str(e.value)
