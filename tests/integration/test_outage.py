"""A storage outage mid-training is waited out: the store stops after the first checkpoint, comes back
~5 s later (longer than the first retry delays, 1 + 2 s, plus its own stop and start), and the run
finishes (in-process loop: every checkpoint write goes through mtorl.storage)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mtorl import storage
from mtorl.spec import make_job
from tests.fixtures.datasets import TINY_MODEL, JOURNEYS_FORMAT, write_journeys_csv

pytestmark = pytest.mark.integration

OUTAGE_S = 5  # the store is down this long (plus its own stop and start times)


@pytest.mark.parametrize("workers", [0, 1], ids=["in-process", "ray-train-worker"])
def test_a_store_outage_mid_training_is_waited_out(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """workers 0: every checkpoint write goes through mtorl.storage; 1: Ray Train uploads the worker's
    checkpoints and writes its snapshot itself, through the run's retrying storage filesystem."""
    from mtorl.data.prepare import prepare
    from mtorl.storage import seaweed
    from mtorl.training.driver import run_train

    d = tmp_path / "outage-store"
    port = seaweed.free_ports(1)[0]
    st = seaweed.up(d, port)
    threads: list[threading.Thread] = []
    try:
        for k, v in seaweed.env_vars(st).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("MTORL_STORE_DIR", str(d))
        monkeypatch.setenv("MTORL_STORAGE_RETRY_S", "90")
        data = "s3://outage/data"
        prepare(
            make_job(
                "PrepareJob",
                "p",
                {
                    "source": "journeys",
                    "input": str(write_journeys_csv(tmp_path / "j.csv", users=60)),
                    "output": data,
                    "journeys": JOURNEYS_FORMAT,
                },
            ).spec,
            progress=lambda *_: None,
        )
        job = make_job(
            "TrainJob",
            f"outage-{workers}",
            {
                "data": data,
                "output": "s3://outage/runs",
                "window": {"length": 8},
                "model": TINY_MODEL,
                "trainer": {"workers": workers, "epochs": 6, "batch_size": 16, "keep_top_k": 1},
                "tracking": {"wandb": "disabled"},
            },
        )
        outage: dict[str, Any] = {}

        def stop_then_restart() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # the first checkpoint is in: the run is under way
                try:
                    if any(f.endswith("/meta.json") for f in storage.list_files(f"s3://outage/runs/outage-{workers}")):
                        break
                except storage.StorageError:
                    pass
                time.sleep(0.5)
            outage["down_at"] = time.monotonic()
            seaweed.down(d)
            time.sleep(OUTAGE_S)
            seaweed.up(d, port)
            outage["up_at"] = time.monotonic()

        t = threading.Thread(target=stop_then_restart, daemon=True)
        threads.append(t)
        t.start()
        res = run_train(job, progress=print)
        ended = time.monotonic()
        t.join(timeout=120)
        assert "up_at" in outage and outage["up_at"] - outage["down_at"] >= OUTAGE_S
        # the outage fell inside the run: the store was down from down_at for at least OUTAGE_S (up_at is
        # later still by up()'s own readiness checks, which the run's retry need not wait for)
        assert outage["down_at"] + OUTAGE_S < ended, (outage, ended)
        assert res["final_metrics"]["epoch"] == 5 and storage.exists(res["best_checkpoint"] + "/meta.json")
    finally:
        for th in threads:  # a failed run must not leave the restart thread to start a store after us
            th.join(timeout=60)
        seaweed.down(d)
