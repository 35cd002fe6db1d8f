"""mtorl.storage without a server: local paths, settings resolution, secret hygiene."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from mtorl import storage
from mtorl.storage import S3Settings, StorageError, s3_settings
from mtorl.storage.seaweed import StoreState, env_lines

AWS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for k in AWS_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MTORL_STORE_DIR", str(tmp_path / "store"))
    return tmp_path / "store"


def test_resolve_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fs, path = storage.resolve(str(tmp_path / "a" / "b.txt"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "a" / "b.txt")
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("rel/x")[1] == str(tmp_path / "rel" / "x")
    assert storage.resolve(f"file://{tmp_path}/y")[1] == str(tmp_path / "y")
    with pytest.raises(StorageError, match="gs://b/k.*unsupported"):
        storage.resolve("gs://b/k")


def test_resolve_s3_path(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    fs, path = storage.resolve("s3://bucket/a/b")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/a/b"
    assert storage.resolve("s3://bucket")[1] == "bucket"
    with pytest.raises(StorageError, match="no bucket"):
        storage.resolve("s3:///k")


def test_join() -> None:
    assert storage.join("s3://b/x/", "y", "/z.json") == "s3://b/x/y/z.json"
    assert storage.join("/data/a", "b") == "/data/a/b"
    assert storage.join("s3://b") == "s3://b"


def test_atomic_write_read_and_json(tmp_path: Path) -> None:
    uri = str(tmp_path / "deep" / "dir" / "f.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert sorted(p.name for p in (tmp_path / "deep" / "dir").iterdir()) == ["f.bin"]  # no temp left
    storage.write_json(str(tmp_path / "m.json"), {"a": [1, 2]})
    assert storage.read_json(str(tmp_path / "m.json")) == {"a": [1, 2]}
    assert storage.exists(uri) and not storage.exists(str(tmp_path / "nope"))


def test_missing_local_file_names_uri(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(StorageError) as e:
        storage.read_json(missing)
    assert missing in str(e.value) and "not found" in str(e.value) and "\n" not in str(e.value)


def test_dirs_list_delete(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    dest = str(tmp_path / "out")
    storage.upload_dir(src, dest)
    assert storage.list_files(dest) == [f"{dest}/a.txt", f"{dest}/sub/b.txt"]
    back = tmp_path / "back"
    storage.download_dir(dest, back)
    assert (back / "sub" / "b.txt").read_text() == "b"
    storage.delete_prefix(dest)
    assert storage.list_files(dest) == [] and not Path(dest).exists()
    storage.delete_prefix(dest)  # missing: no-op
    with pytest.raises(StorageError, match="not found"):
        storage.download_dir(dest, back)


def test_settings_from_env_win(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_state(clean_env)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    st = s3_settings()
    assert (st.endpoint, st.access_key, st.secret_key, st.region, st.source) == (
        "http://minio:9000", "envkey", "envsecret", "eu-west-1", "env")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example:443")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    st = s3_settings()
    assert st.endpoint == "https://s3.example:443" and st.region == "us-west-2"
    fs = storage.pyarrow_s3(st)
    assert isinstance(fs, pafs.S3FileSystem) and fs.region == "us-west-2"
    assert storage.boto3_client(st) is storage.boto3_client(st)  # cached per settings


def test_settings_real_aws_has_no_endpoint(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    st = s3_settings()
    assert st.endpoint is None and st.region == "us-east-1"
    assert storage.boto3_client(st).meta.endpoint_url.startswith("https://s3.")


def test_settings_from_state_file(clean_env: Path) -> None:
    _write_state(clean_env)
    st = s3_settings()
    assert (st.endpoint, st.access_key, st.secret_key, st.region) == (
        "http://127.0.0.1:9999", "statekey", "statesecret", "us-east-1")
    assert st.source.startswith("state:")


def test_settings_nothing_configured(clean_env: Path) -> None:
    st = s3_settings()
    assert st.access_key is None and st.secret_key is None and st.source == "default"


def test_repr_hides_secret() -> None:
    st = S3Settings("http://h:1", "AKID", "TOPSECRET", "us-east-1")
    assert "TOPSECRET" not in repr(st) and "TOPSECRET" not in str(st) and "AKID" in repr(st)
    state = StoreState(Path("/x"), "http://127.0.0.1:1", "AKID", "TOPSECRET", ports={"s3": 1})
    assert "TOPSECRET" not in repr(state)
    assert "export AWS_SECRET_ACCESS_KEY=TOPSECRET" in env_lines(state)  # the one deliberate exception


def _write_state(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_text(json.dumps({
        "endpoint": "http://127.0.0.1:9999", "access_key": "statekey", "secret_key": "statesecret",
        "region": "us-east-1", "pid": None, "ports": {"s3": 9999}}))
    os.chmod(d / "state.json", 0o600)
