"""An in-process run (``trainer.workers: 0``) of splits small enough to cache needs no Ray cluster: it runs in
Ray Train's local mode in this process, and nothing starts one (``ray.nodes``, the progress queue actor and
Ray Data would each start a local Ray on first use). The run goes in a fresh interpreter: the test process
may already hold the suite's own Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from mtorl.spec import make_job
from mtorl.training.driver import needs_ray
from tests.fixtures.shards import small_sharded_dataset

ROOT = Path(__file__).resolve().parents[2]
MODEL = {"name": "mtorl", "hidden": 8, "tcn": {"levels": 1, "kernel_size": 2}, "attention": {"heads": 1},
         "decoder_hidden": 8}

RUN = """
import json, sys
import ray
from mtorl.spec import make_job
from mtorl.training.checkpoint import load_checkpoint
from mtorl.training.driver import run_train
data, out, model = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
def job(epochs):
    return make_job("TrainJob", "local", {"data": data, "output": out, "window": {"length": 6}, "model": model,
                    "trainer": {"workers": 0, "epochs": epochs, "batch_size": 16, "seed": 0},
                    "tracking": {"wandb": "disabled"}})
said = []
first = run_train(job(1), progress=said.append)
h1 = load_checkpoint(first["latest_checkpoint"]).meta.history
ray_after_first = ray.is_initialized()
again = run_train(job(2), progress=said.append)  # resumes epoch 0's checkpoint
h2 = load_checkpoint(again["latest_checkpoint"]).meta.history
print(json.dumps({"said": said, "ray": [ray_after_first, ray.is_initialized()], "h1": h1, "h2": h2}, default=str))
"""


def _job(data: str, out: str, **trainer: Any) -> Any:
    t = {"workers": 0, "epochs": 2, "batch_size": 16, "seed": 0, **trainer}
    return make_job("TrainJob", "local", {"data": data, "output": out, "window": {"length": 6}, "model": MODEL,
                                          "trainer": t, "tracking": {"wandb": "disabled"}})


def test_needs_ray_only_for_train_workers_or_a_streamed_split(tmp_path: Path) -> None:
    ds = small_sharded_dataset(tmp_path)
    assert needs_ray(_job(ds, str(tmp_path / "runs"))) is False
    assert needs_ray(_job(ds, str(tmp_path / "runs"), workers=1)) is True
    assert needs_ray(_job(ds, str(tmp_path / "runs"), cache_windows_max_steps=0)) is True  # both splits stream


def test_an_in_process_run_of_cached_splits_trains_and_resumes_without_a_cluster(tmp_path: Path) -> None:
    ds = small_sharded_dataset(tmp_path)
    p = subprocess.run([sys.executable, "-c", RUN, ds, str(tmp_path / "runs"), json.dumps(MODEL)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["ray"] == [False, False], "an in-process run of cached splits started a Ray cluster"
    assert any(s.startswith("ray: not started") for s in r["said"]), r["said"]
    assert [h["epoch"] for h in r["h1"]] == [0]
    assert [h["epoch"] for h in r["h2"]] == [0, 1] and r["h2"][0] == r["h1"][0]
