"""Corrupt or missing prepared data is refused with one line naming the shard (the manifest's sha256 is
checked as each shard is read), through the CLI's top-level handler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mtorl import storage
from tests.fixtures.datasets import TINY_MODEL, JOURNEYS_FORMAT, write_journeys_csv
from tests.fixtures.shards import flip_a_byte

pytestmark = pytest.mark.integration



@pytest.fixture
def small_dataset(s3_store: Any, s3_bucket: str, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    from mtorl.data.prepare import prepare
    from mtorl.spec import make_job

    uri = f"{s3_bucket}/data/small"
    m = prepare(
        make_job(
            "PrepareJob",
            "small",
            {
                "source": "journeys",
                "input": str(write_journeys_csv(tmp_path / "j.csv", users=40)),
                "output": uri,
                "journeys": JOURNEYS_FORMAT,
            },
        ).spec,
        progress=lambda *_: None,
    )
    return uri, m


def _train_spec(tmp: Path, data: str, out: str) -> Path:
    p = tmp / "train.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "mtorl/v1",
                "kind": "TrainJob",
                "metadata": {"name": "corrupt"},
                "spec": {
                    "data": data,
                    "output": out,
                    "window": {"length": 8},
                    "model": TINY_MODEL,
                    "trainer": {"workers": 0, "epochs": 1, "batch_size": 16, "max_failures": 0},
                    "tracking": {"wandb": "disabled"},
                },
            }
        )
    )
    return p


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_a_flipped_byte_in_a_shard_is_refused_naming_it(
    ray_session: None,
    small_dataset: tuple[str, dict[str, Any]],
    s3_bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mtorl.cli import main
    from mtorl.data.pipeline import read_split

    uri, m = small_dataset
    assert read_split(uri, "train", m).count() == m.splits["train"].users  # intact: reads fine
    shard = flip_a_byte(uri, m, "train", 0)
    capsys.readouterr()
    code = main(["train", str(_train_spec(tmp_path, uri, f"{s3_bucket}/runs"))])
    lines = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {shard}: sha256 mismatch"), lines


def test_a_missing_shard_is_one_line_naming_it(ray_session: None, small_dataset: tuple[str, dict[str, Any]]) -> None:
    from mtorl.data.errors import DataError
    from mtorl.data.pipeline import read_split
    from mtorl.errors import find_known

    uri, m = small_dataset
    shard = storage.join(uri, m.splits["val"].shards[0].path)
    bucket, key = shard[len("s3://") :].split("/", 1)
    storage.boto3_client().delete_object(Bucket=bucket, Key=key)
    assert not storage.exists(shard)
    with pytest.raises(Exception) as e:
        read_split(uri, "val", m).count()
    known = find_known(e.value)
    assert isinstance(known, DataError) and str(known).startswith(f"{shard}: shard listed in the manifest is missing")
