"""The embedded SeaweedFS store and mtorl.storage against it (real server, loopback ports)."""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtorl import storage
from mtorl.cli import store_command
from mtorl.storage import StorageError, seaweed

pytestmark = pytest.mark.integration


def test_up_write_down_up_keeps_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "own-store"
    port = seaweed.free_ports(1)[0]
    assert store_command("up", str(d), port) == 0
    up_out = capsys.readouterr().out
    st = seaweed._load(d)
    assert st is not None and f"export AWS_SECRET_ACCESS_KEY={st.secret_key}" in up_out
    assert stat.S_IMODE((d / "state.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "s3.json").stat().st_mode) == 0o600
    try:
        c = storage.boto3_client(st.settings())
        c.create_bucket(Bucket="keep")
        c.put_object(Bucket="keep", Key="a/b.txt", Body=b"persist me")
        big = os.urandom(3 * 1024 * 1024 + 17)  # several chunks, written just before `down`
        c.put_object(Bucket="keep", Key="a/big.bin", Body=big)
        assert seaweed.up(d).was_running  # second up: already running, same pid
        assert store_command("status", str(d), None) == 0
        pid = st.pid
        assert pid is not None
        assert store_command("down", str(d), None) == 0
        assert seaweed._cmdline(pid) is None  # the process is really gone
        assert seaweed.status(d)["running"] is False
        assert store_command("status", str(d), None) == 1
        other_out = capsys.readouterr().out

        st2 = seaweed.up(d)  # same port and keys from state.json
        assert (st2.port, st2.access_key, st2.secret_key) == (port, st.access_key, st.secret_key)
        body = storage.boto3_client(st2.settings()).get_object(Bucket="keep", Key="a/b.txt")["Body"].read()
        assert body == b"persist me"
        got = storage.boto3_client(st2.settings()).get_object(Bucket="keep", Key="a/big.bin")["Body"].read()
        assert got == big
    finally:
        seaweed.down(d)

    # the secret only ever appears in `store up`'s env lines (and the 0600 state/config files)
    assert st.secret_key not in other_out
    assert st.secret_key not in str(seaweed.status(d)) and st.secret_key not in repr(st)
    for log in (d / "logs").rglob("*"):
        if log.is_file():
            assert st.secret_key not in log.read_text(errors="replace"), log.name


def test_down_leaves_unrelated_pid_alone(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        d = tmp_path / "fake"
        d.mkdir()
        st = seaweed.StoreState(d, "http://127.0.0.1:1", "k", "s", pid=sleeper.pid, ports={"s3": 1})
        seaweed._save(st)
        assert seaweed.status(d)["running"] is False
        assert seaweed.down(d) is None
        assert sleeper.poll() is None  # still alive: not a weed over this store
    finally:
        sleeper.kill()
        sleeper.wait()


def test_wrong_credentials_are_refused(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = storage.join(s3_bucket, "k.bin")
    storage.write_bytes(uri, b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    for op in (lambda: storage.read_bytes(uri), lambda: storage.write_bytes(uri, b"y"), lambda: storage.exists(uri)):
        with pytest.raises(StorageError) as e:
            op()
        msg = str(e.value)
        assert msg.startswith(uri) and "refused the credentials" in msg and "\n" not in msg
        assert "definitely-wrong-secret" not in msg


def test_missing_bucket_and_key(s3_store: object) -> None:
    bucket = f"s3://missing-{uuid.uuid4().hex[:8]}"
    uri = storage.join(bucket, "x.json")
    with pytest.raises(StorageError, match="does not exist") as e:
        storage.read_json(uri)
    assert str(e.value).startswith(uri)
    assert storage.exists(uri) is False and storage.exists(bucket) is False
    storage.write_json(uri, {"ok": 1})  # a write creates the bucket
    assert storage.read_json(uri) == {"ok": 1} and storage.exists(bucket)
    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(storage.join(bucket, "nope"))


def test_pyarrow_roundtrip_and_trees(s3_bucket: str, tmp_path: Path) -> None:
    fs, path = storage.resolve(storage.join(s3_bucket, "ds", "part-00000.parquet"))
    assert path == s3_bucket[len("s3://"):] + "/ds/part-00000.parquet"
    table = pa.table({"user_id": ["a", "b"], "length": pa.array([3, 4], pa.int32())})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.exists(storage.join(s3_bucket, "ds"))  # a "directory"

    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "meta.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 10)
    dest = storage.join(s3_bucket, "run", "ckpt")
    storage.upload_dir(src, dest)
    assert storage.list_files(dest) == [f"{dest}/meta.json", f"{dest}/sub/w.bin"]
    storage.download_dir(dest, tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "w.bin").read_bytes() == b"\0" * 10
    storage.delete_prefix(storage.join(s3_bucket, "run"))
    assert storage.list_files(dest) == []
    assert storage.list_files(storage.join(s3_bucket, "ds")) == [storage.join(s3_bucket, "ds", "part-00000.parquet")]


def test_up_restarts_from_a_shell_holding_the_printed_env(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's repro: store up; eval its export lines; store down; store up -> ready, same data."""
    import time

    d = tmp_path / "restart-store"
    port = seaweed.free_ports(1)[0]
    assert store_command("up", str(d), port) == 0
    out = capsys.readouterr().out
    try:
        for line in out.splitlines():
            if line.startswith("export "):
                k, v = line.removeprefix("export ").split("=", 1)
                monkeypatch.setenv(k, v)
        st = seaweed._load(d)
        assert st is not None
        storage.boto3_client(st.settings()).create_bucket(Bucket="owned")
        storage.boto3_client(st.settings()).put_object(Bucket="owned", Key="k", Body=b"v")
        assert store_command("down", str(d), None) == 0
        t0 = time.monotonic()
        assert store_command("up", str(d), port) == 0, capsys.readouterr().err
        assert time.monotonic() - t0 < 60
        st2 = seaweed._load(d)
        assert st2 is not None and st2.pid
        assert storage.boto3_client(st2.settings()).get_object(Bucket="owned", Key="k")["Body"].read() == b"v"
        assert store_command("up", str(d), port) == 0  # an up over a serving store leaves it alone
        assert seaweed._load(d).pid == st2.pid and seaweed._cmdline(st2.pid) is not None  # type: ignore[union-attr]
    finally:
        seaweed.down(d)
