"""Both shared samples: prepare -> object store (S3) -> Ray Data windows and journeys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.shared_data]


@pytest.mark.parametrize("source,name,users,rows", [
    ("kuairand-sequence", "kuairand_sequence.csv.gz", 4839, 100979),
    ("criteo-sequence", "criteo_sequence.csv.gz", 6039, 88998),
])
def test_prepare_to_s3_then_windows(shared_data: Path, s3_bucket: str, ray_session: None,
                                    request: pytest.FixtureRequest, source: str, name: str, users: int,
                                    rows: int) -> None:
    from mtorl.data.pipeline import iter_journeys, load_manifest, manifest_sha256, window_dataset
    from mtorl.data.prepare import prepare
    from mtorl.spec.models import PrepareSpec, WindowSpec

    if source == "kuairand-sequence":  # the session's shared preparation (the same settings as below)
        uri, m = request.getfixturevalue("kuairand_prepared")
    else:
        uri = f"{s3_bucket}/data/{source}"
        m = prepare(PrepareSpec(source=source, input=str(shared_data / name), output=uri, min_steps=1,
                                shard_max_steps=20_000), progress=lambda _m: None)
    assert load_manifest(uri) == m and len(manifest_sha256(uri)) == 64
    assert m.users_read == users and m.rows_written == rows
    assert len(m.splits["train"].shards) >= 2

    L = 16
    D = len(m.step_features) + len(m.user_features)
    import ray

    v2 = ray.data.DataContext.get_current().use_datasource_v2
    ds = window_dataset(uri, "val", WindowSpec(length=L), manifest=m)  # reads with the V1 Parquet reader ...
    assert ray.data.DataContext.get_current().use_datasource_v2 == v2  # ... and leaves the global context alone
    n_windows = valid = done = 0
    for b in ds.iter_batches(batch_size=128, batch_format="numpy"):
        B = b["state"].shape[0]
        assert b["state"].shape == (B, L, D) and b["state"].dtype == np.float32
        for k in ("prev_channel", "channel"):
            assert b[k].shape == (B, L) and b[k].dtype == np.int64
        assert b["mask"].dtype == bool and b["done"].dtype == bool
        assert ((b["channel"] >= 0) == b["mask"]).all()
        assert ((b["reward"] >= 0) & (b["reward"] <= 1)).all()
        n_windows += B
        valid += int(b["mask"].sum())
        done += int(b["done"].sum())
    val = m.splits["val"]
    assert valid == val.steps and done == val.users and n_windows >= val.users

    js = list(iter_journeys(uri, "test", manifest=m))
    assert len(js) == m.splits["test"].users and sum(j.length for j in js) == m.splits["test"].steps
    assert js[0].state.shape[1] == D
