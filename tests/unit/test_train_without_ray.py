"""An in-process run (``trainer.workers: 0``) of splits small enough to cache needs no Ray cluster: it runs in
Ray Train's local mode in this process, and nothing starts one (``ray.nodes``, the progress queue actor and
Ray Data would each start a local Ray on first use)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from mtorl.spec import make_job
from mtorl.training.checkpoint import load_checkpoint
from mtorl.training.driver import needs_ray, run_train
from tests.fixtures.shards import small_sharded_dataset

MODEL = {"name": "mtorl", "hidden": 8, "tcn": {"levels": 1, "kernel_size": 2}, "attention": {"heads": 1},
         "decoder_hidden": 8}


def _job(data: str, out: str, **trainer: Any) -> Any:
    t = {"workers": 0, "epochs": 2, "batch_size": 16, "seed": 0, **trainer}
    return make_job("TrainJob", "local", {"data": data, "output": out, "window": {"length": 6}, "model": MODEL,
                                          "trainer": t, "tracking": {"wandb": "disabled"}})


def test_needs_ray_only_for_train_workers_or_a_streamed_split(tmp_path: Path) -> None:
    ds = small_sharded_dataset(tmp_path)
    assert needs_ray(_job(ds, str(tmp_path / "runs"))) is False
    assert needs_ray(_job(ds, str(tmp_path / "runs"), workers=1)) is True
    assert needs_ray(_job(ds, str(tmp_path / "runs"), cache_windows_max_steps=0)) is True  # both splits stream
    assert not ray.is_initialized()


def test_an_in_process_run_of_cached_splits_trains_and_resumes_without_a_cluster(tmp_path: Path) -> None:
    ds = small_sharded_dataset(tmp_path)
    said: list[str] = []
    res = run_train(_job(ds, str(tmp_path / "runs"), epochs=1), progress=said.append)
    assert not ray.is_initialized(), "an in-process run of cached splits started a Ray cluster"
    assert any(s.startswith("ray: not started") for s in said), said
    assert [h["epoch"] for h in load_checkpoint(res["latest_checkpoint"]).meta.history] == [0]
    again = run_train(_job(ds, str(tmp_path / "runs"), epochs=2), progress=said.append)  # resumes epoch 0's checkpoint
    hist = load_checkpoint(again["latest_checkpoint"]).meta.history
    assert [h["epoch"] for h in hist] == [0, 1] and hist[0] == load_checkpoint(res["latest_checkpoint"]).meta.history[0]
    assert not ray.is_initialized()
