"""The console of `mtorl train` off a terminal, and its W&B offline run, resumable (one run per sweep
trial: tests/integration/test_secrets.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.datasets import TINY_MODEL
import yaml

from mtorl.spec import job_to_dict, make_job
from tests.fixtures.wandb_files import offline_runs

pytestmark = pytest.mark.integration

CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # any control character but the newline
NOISE = re.compile(r"WARNING|ERROR|Traceback|Fatal Python error|\(raylet\)|pid=\d+")


def _train_job(name: str, data: str, out: str, epochs: int, workers: int = 0) -> Any:
    return make_job(
        "TrainJob",
        name,
        {
            "data": data,
            "output": out,
            "window": {"length": 10},
            "model": TINY_MODEL,
            "trainer": {"workers": workers, "epochs": epochs, "batch_size": 32, "max_steps_per_epoch": 4},
            "tracking": {"wandb": "offline", "project": "mtorl-test"},
        },
    )


def _mtorl(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtorl", *args], capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )


def test_cli_train_off_a_terminal_one_line_per_epoch_and_one_resumable_wandb_run(
    ray_session: None, tiny_dataset: str, s3_bucket: str, tmp_path: Path
) -> None:
    import ray

    spec = tmp_path / "train.yaml"
    spec.write_text(yaml.safe_dump(job_to_dict(_train_job("cli-console", tiny_dataset, f"{s3_bucket}/runs", epochs=2))))
    env = {"WANDB_DIR": str(tmp_path / "wb"), "WANDB_MODE": "offline", "MTORL_LOG_LEVEL": ""}
    address = ray.get_runtime_context().gcs_address
    # the val split streams (cache limit 0), so the run needs Ray: it joins the cluster at --address
    r = _mtorl(["train", str(spec), "--address", address, "--set", "spec.trainer.cache_windows_max_steps=0"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert not CONTROL.search(out), repr(out)
    epochs = [ln for ln in out.splitlines() if ln.startswith("epochs: ")]
    assert [ln.split(" [")[0] for ln in epochs] == ["epochs: 1/2", "epochs: 2/2"], out
    assert all("loss " in ln and "val/loss " in ln for ln in epochs)
    assert sum(ln.startswith("Ray logs: ") for ln in out.splitlines()) == 1
    assert not [ln for ln in (out + r.stderr).splitlines() if NOISE.search(ln)], out + r.stderr
    log = re.search(r"^Ray logs: (\S+) \(this process: (\S+?)\)", out, flags=re.M)
    assert log and (Path(log.group(1)) / log.group(2)).is_file()  # Ray's output of this command went there

    (run,) = offline_runs(tmp_path / "wb")
    assert run.run_id == "cli-console" and run.name == "cli-console"
    assert run.config["trainer"]["epochs"] == 2 and run.config["job"] == "cli-console"
    rows = [h for h in run.history if "train/loss" in h]
    assert [h["train/epoch"] for h in rows] == [0, 1]
    assert all({"val/loss", "val/reward_auc", "train/samples_per_s"} <= set(h) for h in rows)
    assert all("/" in k for h in rows for k in h if not k.startswith("_"))  # namespaced metrics only

    # a third epoch re-runs the same job: it resumes the checkpoint and continues the same W&B run
    # every split cached: an in-process run needs no cluster, so none is joined and no Ray log is named
    r = _mtorl(["train", str(spec), "--address", address, "--set", "spec.trainer.epochs=3"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [ln for ln in r.stdout.splitlines() if ln.startswith("Ray logs: ")], r.stdout
    assert "ray: not started (trainer.workers: 0 and every split cached)" in r.stdout, r.stdout
    noisy = [ln for ln in (r.stdout + r.stderr).splitlines() if NOISE.search(ln) or " INFO " in ln]
    assert not noisy, r.stdout + r.stderr
    assert [ln.split(" [")[0] for ln in r.stdout.splitlines() if ln.startswith("epochs: ")] == ["epochs: 3/3"], r.stdout
    runs = offline_runs(tmp_path / "wb")
    assert len(runs) == 2 and {x.run_id for x in runs} == {"cli-console"}
    later = next(x for x in runs if x.file != run.file)
    assert [h["train/epoch"] for h in later.history if "train/loss" in h] == [2]
