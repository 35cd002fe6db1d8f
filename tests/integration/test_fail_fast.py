"""Requests the cluster can't place fail within seconds, naming what is missing (train, tune, serve)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from mtorl.raycluster import ResourceError
from mtorl.spec import make_job

pytestmark = pytest.mark.integration


def test_too_many_workers_fail_fast(ray_session: None, tiny_dataset: str, s3_bucket: str) -> None:
    import ray

    from mtorl.training.driver import run_train
    from mtorl.tuning.sweep import run_tune

    cpus = ray.cluster_resources()["CPU"]
    base = {
        "data": tiny_dataset,
        "output": f"{s3_bucket}/runs",
        "trainer": {"workers": int(cpus) + 1, "epochs": 1},
        "tracking": {"wandb": "disabled"},
    }
    t0 = time.monotonic()
    with pytest.raises(
        ResourceError,
        match=rf"trainer.workers={int(cpus) + 1} x cpus_per_worker=1: .* needs "
        rf"{int(cpus) + 1} CPU in all .* the cluster has {cpus:g}",
    ):
        run_train(make_job("TrainJob", "too-big", base), progress=lambda *_: None)
    with pytest.raises(ResourceError, match="needs 1 GPU in all"):
        run_train(
            make_job("TrainJob", "gpu", {**base, "trainer": {"workers": 1, "use_gpu": True}}), progress=lambda *_: None
        )
    with pytest.raises(ResourceError):
        run_tune(
            make_job(
                "TuneJob",
                "too-big",
                {
                    "base": base,
                    "output": f"{s3_bucket}/sweeps",
                    "parameters": {"trainer.lr": {"min": 1e-3, "max": 1e-2}},
                },
            ),
            progress=lambda *_: None,
        )
    assert time.monotonic() - t0 < 60


def test_tune_on_a_missing_dataset_is_one_line(
    ray_session: None, s3_bucket: str, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    import yaml

    from mtorl.cli import main

    spec = tmp_path / "tune.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "mtorl/v1",
                "kind": "TuneJob",
                "metadata": {"name": "nodata"},
                "spec": {
                    "base": {
                        "data": f"{s3_bucket}/no-such-dataset",
                        "output": f"{s3_bucket}/runs",
                        "trainer": {"workers": 1},
                        "tracking": {"wandb": "disabled"},
                    },
                    "output": f"{s3_bucket}/sweeps",
                    "parameters": {"trainer.lr": {"min": 1e-3, "max": 1e-2}},
                },
            }
        )
    )
    assert main(["tune", str(spec)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [
        f"error: no manifest.json at {s3_bucket}/no-such-dataset: not a prepared dataset, or prepare did not finish"
    ]
