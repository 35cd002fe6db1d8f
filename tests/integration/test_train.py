"""Ray Train on real local Ray + SeaweedFS: 2 workers, resume, worker failure, NaN stop, determinism."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from mtorl import faults, storage
from mtorl.spec import make_job
from mtorl.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration

SMALL_MODEL = {"name": "mtorl", "hidden": 16, "tcn": {"levels": 2, "kernel_size": 2}, "attention": {"heads": 2}, "decoder_hidden": 16}


def _job(name: str, data: str, out: str, **trainer: Any) -> Any:
    t = {"workers": 2, "cpus_per_worker": 1, "epochs": 2, "batch_size": 32, "seed": 0, "keep_top_k": 2, **trainer}
    return make_job("TrainJob", name, {"data": data, "output": out, "window": {"length": 10}, "model": SMALL_MODEL,
                                       "trainer": t, "tracking": {"wandb": "disabled"}})


def _history(uri: str) -> list[dict[str, Any]]:
    return list(load_checkpoint(uri).meta.history)


def test_two_workers_on_kuairand_checkpoint_to_object_store(ray_session: None, kuairand_dataset: str, s3_bucket: str) -> None:
    from mtorl.training.driver import run_train

    job = _job("kuai-2w", kuairand_dataset, f"{s3_bucket}/runs", epochs=2, max_steps_per_epoch=25)
    res = run_train(job, progress=print)
    assert res["best_checkpoint"].startswith(f"{s3_bucket}/runs/kuai-2w/")
    best = json.loads(storage.read_bytes(f"{s3_bucket}/runs/kuai-2w/best.json"))
    assert best["checkpoint"] == res["best_checkpoint"] and best["metric"] == "val/loss"
    ck = load_checkpoint(f"{s3_bucket}/runs/kuai-2w")  # the run dir resolves to its best
    assert ck.meta.spec["metadata"]["name"] == "kuai-2w"
    assert ck.meta.manifest.channels == ["short", "mid", "long"] or sorted(ck.meta.manifest.channels) == ["long", "mid", "short"]
    assert ck.meta.manifest_sha256 and ck.meta.mtorl_version
    hist = _history(res["latest_checkpoint"])
    assert [h["epoch"] for h in hist] == [0, 1]
    for h in hist:
        assert math.isfinite(h["train/loss"]) and math.isfinite(h["val/loss"])
        assert 0.0 <= h["val/reward_auc"] <= 1.0 and 0.0 <= h["val/accuracy"] <= 1.0
    assert res["samples_per_s"] > 0
    assert len(res["node_ids"]) >= 1


def test_rerun_resumes_from_latest_checkpoint(ray_session: None, tiny_dataset: str, s3_bucket: str) -> None:
    from mtorl.training.driver import run_train

    out = f"{s3_bucket}/runs"
    first = run_train(_job("resume", tiny_dataset, out, workers=1, epochs=1), progress=print)
    h1 = _history(first["latest_checkpoint"])
    second = run_train(_job("resume", tiny_dataset, out, workers=1, epochs=3), progress=print)
    h2 = _history(second["latest_checkpoint"])
    assert [h["epoch"] for h in h2] == [0, 1, 2]
    assert h2[0] == h1[0], "the resumed run must keep the first run's epoch, not redo it"
    assert h2[1]["step"] > h1[0]["step"]


def test_worker_crash_is_restarted_and_history_stays_continuous(ray_session: None, tiny_dataset: str, s3_bucket: str,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mtorl.training.driver import run_train

    marker = tmp_path / "crashed"
    # during epoch 2 (of 2): epoch 1 has about 2-3 steps per worker, so the restart resumes its checkpoint
    monkeypatch.setenv(*faults.env({"train.crash_at_step": 4, "train.crash_marker": str(marker)}))
    res = run_train(_job("crash", tiny_dataset, f"{s3_bucket}/runs", workers=2, epochs=2, batch_size=8, max_failures=2), progress=print)
    assert marker.exists(), "the injected crash did not happen"
    hist = _history(res["latest_checkpoint"])
    assert [h["epoch"] for h in hist] == [0, 1]
    steps = [h["step"] for h in hist]
    assert steps == sorted(steps)


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(ray_session: None, tiny_dataset: str, s3_bucket: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train import TrainingFailedError

    from mtorl.training.driver import run_train

    monkeypatch.setenv(*faults.env({"train.nan_at_step": 5}))
    with pytest.raises(TrainingFailedError) as e:
        run_train(_job("nan", tiny_dataset, f"{s3_bucket}/runs", workers=1, epochs=3, batch_size=16, max_steps_per_epoch=3, max_failures=0), progress=print)
    assert "non-finite loss" in str(e.value)
    files = storage.list_files(f"{s3_bucket}/runs/nan")
    assert any(f.endswith("model.safetensors") for f in files), "the epoch-1 checkpoint must survive"


def test_same_seed_same_metrics(ray_session: None, tiny_dataset: str, s3_bucket: str) -> None:
    from mtorl.training.driver import run_train

    a = run_train(_job("det-a", tiny_dataset, f"{s3_bucket}/runs", workers=0, epochs=1), progress=print)
    b = run_train(_job("det-b", tiny_dataset, f"{s3_bucket}/runs", workers=0, epochs=1), progress=print)
    ha, hb = _history(a["latest_checkpoint"])[0], _history(b["latest_checkpoint"])[0]
    for k in ("train/loss", "val/loss", "val/reward_auc"):
        assert ha[k] == pytest.approx(hb[k], rel=1e-5, abs=1e-6), k
