"""Shard reads: sha256 checked, missing shard and an unreachable store are one line; retries wait out an outage."""

from __future__ import annotations

import hashlib
import io
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtorl.data.errors import DataError
from mtorl.data.manifest import parse_shard, read_shard_bytes


def _parquet() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"user_id": ["a", "b"], "length": pa.array([1, 2], pa.int32())}), buf)
    return buf.getvalue()


def test_parse_checks_the_sha256() -> None:
    data = _parquet()
    assert parse_shard("s3://b/x.parquet", data, hashlib.sha256(data).hexdigest()).num_rows == 2
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(DataError, match=r"^s3://b/x.parquet: sha256 mismatch \(shard altered or truncated"):
        parse_shard("s3://b/x.parquet", bytes(bad), hashlib.sha256(data).hexdigest())
    with pytest.raises(DataError, match=r"^s3://b/x.parquet: not a readable Parquet shard"):
        parse_shard("s3://b/x.parquet", data[:20], "")


class _FlakyFS:
    """Refuses ``fail`` times (a store that is down), then answers."""

    def __init__(self, fail: int, missing: bool = False) -> None:
        self.fail, self.missing, self.calls = fail, missing, 0

    def open_input_stream(self, path: str) -> Any:
        self.calls += 1
        if self.missing:
            raise FileNotFoundError(path)
        if self.calls <= self.fail:
            raise OSError("When reading information for key 'x': AWS Error NETWORK_CONNECTION: connection refused")
        return pa.BufferReader(b"payload")


def test_reads_wait_out_an_outage_then_name_the_object(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    fs = _FlakyFS(fail=3)
    assert read_shard_bytes(fs, "b/x", "s3://b/x", window_s=60) == b"payload" and fs.calls == 4
    with pytest.raises(DataError, match=r"^s3://b/x: object store unreachable for 0 s: .*connection refused"):
        read_shard_bytes(_FlakyFS(fail=99), "b/x", "s3://b/x", window_s=0)
    with pytest.raises(DataError, match=r"^s3://b/x: shard listed in the manifest is missing$"):
        read_shard_bytes(_FlakyFS(fail=0, missing=True), "b/x", "s3://b/x", window_s=60)


def test_object_store_calls_wait_out_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError

    from mtorl.storage import StorageError
    from mtorl.storage.uri import _s3_call, retrying

    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 4:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        return "ok"

    assert retrying(flaky, window_s=60) == "ok" and calls["n"] == 4

    def denied() -> None:
        calls["n"] += 1
        raise ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject")

    calls["n"] = 0
    with pytest.raises(ClientError):
        retrying(denied, window_s=60)
    assert calls["n"] == 1  # not transient: no retry

    monkeypatch.setenv("MTORL_STORAGE_RETRY_S", "5")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")

    def down() -> None:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    with pytest.raises(StorageError, match=r"^s3://b/k: cannot reach the object store at http://127.0.0.1:9 .*"
                                           r"\(still failing after waiting 5 s\)$"):
        _s3_call("s3://b/k", down)
