"""Ray Tune sweeps of real Ray Train trials: ASHA early stopping, and a 2-trial sweep killed then resumed.

Sizes are the smallest that keep each assertion meaningful: a trial costs its actors' start-up far more
than its steps, so trials and epochs are few and steps per epoch tiny."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.datasets import TINY_MODEL
import yaml

from mtorl import faults, storage
from mtorl.spec import job_to_dict, make_job

pytestmark = pytest.mark.integration



def _sweep(name: str, data: str, out: str, **kw: Any) -> Any:
    base = {
        "data": data,
        "output": out,
        "window": {"length": 10},
        "model": TINY_MODEL,
        "trainer": {
            "workers": kw.pop("workers", 1),
            "epochs": kw.pop("epochs", 2),
            "batch_size": 32,
            "max_steps_per_epoch": kw.pop("steps", 3),
        },
        "tracking": {"wandb": "disabled"},
    }
    spec = {"base": base, "parameters": kw.pop("parameters", {
        "objective.reward_weight": {"type": "double", "min": 0.1, "max": 10.0, "log": True},
        "objective.pref_weight": {"type": "double", "min": 0.0, "max": 1.0}}),
        "objective": {"metric": "val/loss", "mode": "min"}, "output": out, **kw}
    return make_job("TuneJob", name, spec)


def test_asha_stops_a_bad_trial_early(ray_session: None, tiny_dataset: str, s3_bucket: str) -> None:
    from mtorl.tuning.sweep import run_tune

    # grid order: a good learning rate first, then one too small to learn -> cut at the first rung (epoch 1
    # of 2: ASHA's rungs with grace period 1 and reduction factor 2), so it never reaches "completed"
    job = _sweep(
        "asha",
        tiny_dataset,
        f"{s3_bucket}/sweeps",
        epochs=2,
        workers=0,
        algorithm="grid",
        early_stopping="asha",
        parameters={"trainer.lr": {"type": "categorical", "values": [0.03, 1e-9]}},
    )
    res = run_tune(job, progress=print)
    states = {r["config"]["trainer.lr"]: r["state"] for r in res["leaderboard"]}
    assert states[0.03] == "completed"
    assert states[1e-9] == "stopped early"


def test_sweep_interrupted_then_resumed(ray_session: None, tiny_dataset: str, s3_bucket: str,
                                                   tmp_path: Path) -> None:
    """A 2-trial sweep whose driver is killed after its first trial wrote its result but before Tune
    recorded it; re-running resumes it via Tuner.restore, completes it (the second trial runs only then),
    re-runs no completed trial, and still reports the completed trial's epochs to Tune. On the generated
    tiny dataset: every trial builds (materialises) its splits, which on the KuaiRand sample was most of
    this test's time."""
    import ray

    from mtorl.tuning.sweep import run_tune

    # trials in process (trainer.workers 0): what is tested is the sweep's restore, and the driver dies
    # between trials, so no trial's own training is cut (a Ray Train trial is test_secrets' sweep)
    job = _sweep(
        "sweep2", tiny_dataset, f"{s3_bucket}/sweeps", max_trials=2, algorithm="random", early_stopping="none",
        workers=0,
    )
    spec_file = tmp_path / "tune.yaml"
    spec_file.write_text(yaml.safe_dump(job_to_dict(job)))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    trials = storage.join(s3_bucket, "sweeps", "sweep2", "trials")
    # the driver dies right after the first trial writes its best.json, before Tune records it as done
    env.update([faults.env({"tune.kill_driver_after_trial": True})])
    proc = subprocess.Popen([sys.executable, "-m", "mtorl", "tune", str(spec_file)], env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == -signal.SIGKILL, f"the sweep driver was not killed after its first trial (exit {rc})"
    first = [f for f in storage.list_files(trials) if f.endswith("/best.json")]
    assert len(first) == 1, first
    done_before = {f: storage.read_bytes(f) for f in first}

    res = run_tune(job, progress=print)
    assert res["restored"] is True
    assert res["trials"] == 2 and res["failed_trials"] == 0
    names = [r["trial"] for r in res["leaderboard"]]
    assert len(names) == len(set(names))
    assert all(r["state"] == "completed" and r["metric"] is not None for r in res["leaderboard"])
    assert len({r["mu"] for r in res["leaderboard"]}) == 2
    for f, content in done_before.items():  # a completed trial is not re-run: its pointer is untouched
        assert storage.read_bytes(f) == content
    best = yaml.safe_load(storage.read_bytes(res["best"]["trainjob_yaml"]))
    assert best["kind"] == "TrainJob"
    assert best["spec"]["objective"]["reward_weight"] == pytest.approx(res["best"]["config"]["objective.reward_weight"])
    assert res["best"]["checkpoint"] and storage.exists(storage.join(res["best"]["checkpoint"], "model.safetensors"))
    assert storage.read_bytes(res["plot"])[:4] == b"\x89PNG"
