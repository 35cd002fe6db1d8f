"""Training data above the cache threshold streams from object storage every epoch (issue #19)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mtorl.spec import make_job
from mtorl.training.checkpoint import load_checkpoint
from tests.fixtures.datasets import JOURNEYS_FORMAT, write_journeys_csv

pytestmark = pytest.mark.integration

SMALL_MODEL = {
    "name": "mtorl",
    "hidden": 16,
    "tcn": {"levels": 2, "kernel_size": 2},
    "attention": {"heads": 2},
    "decoder_hidden": 16,
}


def _job(name: str, data: str, out: str, **trainer: Any) -> Any:
    t = {
        "workers": 1,
        "cpus_per_worker": 1,
        "epochs": 2,
        "batch_size": 16,
        "seed": 0,
        "max_steps_per_epoch": 4,
        **trainer,
    }
    return make_job(
        "TrainJob",
        name,
        {
            "data": data,
            "output": out,
            "window": {"length": 10},
            "model": SMALL_MODEL,
            "trainer": t,
            "tracking": {"wandb": "disabled"},
        },
    )


def _sharded(bucket: str, tmp_path: Path, name: str) -> str:
    """The tiny journeys prepared into many small shards (100 steps each)."""
    from mtorl.data.prepare import prepare

    uri = f"{bucket}/datasets/{name}"
    prepare(
        make_job(
            "PrepareJob",
            name,
            {
                "source": "journeys",
                "input": str(write_journeys_csv(tmp_path / "j.csv")),
                "output": uri,
                "journeys": JOURNEYS_FORMAT,
                "shard_max_steps": 100,
            },
        ).spec,
        progress=lambda *_: None,
    )
    return uri


def test_file_order_is_reshuffled_every_execution(ray_session: None, s3_bucket: str, tmp_path: Path) -> None:
    from ray.data import FileShuffleConfig

    from mtorl.data.pipeline import load_manifest, read_split

    uri = _sharded(s3_bucket, tmp_path, "sharded")
    m = load_manifest(uri)
    assert len(m.splits["train"].shards) >= 4
    ds = read_split(uri, "train", m, shuffle=FileShuffleConfig(seed=0, reseed_after_execution=True))
    orders = [[r["user_id"] for r in ds.select_columns(["user_id"]).iter_rows()] for _ in range(3)]
    assert all(sorted(o) == sorted(orders[0]) for o in orders)  # every journey once per pass
    assert len({tuple(o) for o in orders}) > 1  # a new file order per pass


def test_split_above_the_threshold_streams_and_says_so(ray_session: None, tiny_dataset: str, s3_bucket: str) -> None:
    from mtorl.training.driver import run_train

    said: list[str] = []
    res = run_train(
        _job("stream", tiny_dataset, f"{s3_bucket}/runs", workers=0, cache_windows_max_steps=0), progress=said.append
    )
    modes = [s for s in said if s.startswith("data: ")]
    assert len(modes) == 2 and all("streaming from object storage every epoch" in s for s in modes), said
    hist = load_checkpoint(res["latest_checkpoint"]).meta.history
    assert [h["epoch"] for h in hist] == [0, 1] and all(h["train/loss"] > 0 for h in hist)


def test_default_threshold_caches_small_splits(ray_session: None, tiny_dataset: str, s3_bucket: str) -> None:
    from mtorl.training.driver import run_train

    said: list[str] = []
    run_train(_job("cached", tiny_dataset, f"{s3_bucket}/runs", workers=0, epochs=1), progress=said.append)
    modes = [s for s in said if s.startswith("data: ")]
    assert len(modes) == 2 and all("cached in memory" in s for s in modes), said


def test_auto_threshold_scales_with_memory() -> None:
    from mtorl.training.driver import auto_cache_max_steps

    small, large = auto_cache_max_steps(10, 8 << 30), auto_cache_max_steps(10, 64 << 30)
    assert large == 8 * small or abs(large - 8 * small) <= 8
    # 10 features: (40 + 38) bytes a step, twice, in an eighth of 8 GiB
    assert small == (8 << 30) // 8 // (2 * (4 * 10 + 38))


def test_a_missing_shard_is_named_in_one_line(s3_bucket: str, tmp_path: Path) -> None:
    from mtorl import storage
    from mtorl.data.errors import DataError
    from mtorl.data.manifest import shard_uris
    from mtorl.data.pipeline import load_manifest, read_split

    uri = _sharded(s3_bucket, tmp_path, "broken")
    m = load_manifest(uri)
    val = shard_uris(uri, m, "val")
    fs, path = storage.resolve(val[0])
    fs.delete_file(path)
    assert not storage.exists(val[0])
    with pytest.raises(DataError, match="missing") as e:
        read_split(uri, "val", m)  # checked before Ray Data plans the read
    assert str(e.value).startswith(val[0]) and "\n" not in str(e.value)
