"""The retrying filesystem Ray Train gets as its storage (no store, no Ray): transient failures are waited
out, others raised at once; uploads are buffered and retried whole; it pickles without keys."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from mtorl.storage import retrying_fs
from mtorl.storage.retrying_fs import RetryingS3Handler, retry_os, retrying_s3, transient_os_error

DOWN = OSError("When getting information for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
               "HeadObject operation: curlCode: 7, Could not connect to server")


class Flaky:
    """A local filesystem whose first ``fail`` calls of each kind raise ``error``."""

    def __init__(self, fail: int, error: OSError = DOWN):
        self.local, self.fail, self.error = pafs.LocalFileSystem(), fail, error
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.local, name)

        def call(*a: Any, **kw: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] <= self.fail and name != "normalize_path":  # that one is local for S3 too
                raise self.error
            return target(*a, **kw)
        return call


def _fs(monkeypatch: pytest.MonkeyPatch, inner: Flaky, window: float = 30.0) -> pafs.PyFileSystem:
    monkeypatch.setattr(RetryingS3Handler, "_fs", lambda self: inner)
    monkeypatch.setattr(retrying_fs.time, "sleep", lambda s: None)  # retry_os's default sleep: no real waits
    return retrying_s3(window)


def test_transient_errors_are_told_apart() -> None:
    assert transient_os_error(DOWN)
    assert transient_os_error(OSError("AWS Error SERVICE_UNAVAILABLE during PutObject operation"))
    assert not transient_os_error(FileNotFoundError("Path does not exist 'b/x'"))
    assert not transient_os_error(OSError("AWS Error ACCESS_DENIED during HeadObject operation: Access Denied"))
    assert not transient_os_error(ValueError("Could not connect"))


def test_retry_waits_out_transient_errors_within_the_window() -> None:
    sleeps: list[float] = []
    calls = iter([DOWN, DOWN, DOWN, "ok"])

    def fn() -> str:
        v = next(calls)
        if isinstance(v, BaseException):
            raise v
        return v
    assert retry_os(fn, 60, sleep=sleeps.append) == "ok"
    assert sleeps == [1.0, 2.0, 4.0]
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):  # a window too short for the next wait: raised as is
        retry_os(lambda: (_ for _ in ()).throw(DOWN), 0.5, sleep=sleeps.append)
    denied = OSError("AWS Error ACCESS_DENIED")
    n = []
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        retry_os(lambda: n.append(1) or (_ for _ in ()).throw(denied), 60, sleep=sleeps.append)
    assert n == [1]  # not retried


def test_a_checkpoint_copy_survives_an_outage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What Ray Train's persist_current_checkpoint does: create_dir, then pyarrow's copy_files into it."""
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"\x01" * 100_000)
    (src / "meta.json").write_text('{"epoch": 1}')
    inner = Flaky(fail=2)
    fs = _fs(monkeypatch, inner)
    dest = tmp_path / "store" / "run" / "checkpoint_1"
    fs.create_dir(str(dest), recursive=True)
    pafs.copy_files(str(src), str(dest), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert (dest / "model.safetensors").read_bytes() == b"\x01" * 100_000
    assert (dest / "meta.json").read_text() == '{"epoch": 1}'
    assert inner.calls["create_dir"] == 3 and inner.calls["open_output_stream"] >= 4  # each file: 2 failures, then ok
    with fs.open_input_stream(str(dest / "meta.json")) as f:  # and read back through it
        assert f.read() == b'{"epoch": 1}'
    info = fs.get_file_info(str(dest / "meta.json"))
    assert info.type == pafs.FileType.File
    fs.delete_dir(str(dest))
    assert not dest.exists()


def test_a_missing_file_is_not_waited_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    inner = Flaky(fail=0)
    fs = _fs(monkeypatch, inner)
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(str(tmp_path / "nope.json"))
    assert inner.calls["open_input_stream"] == 1


def test_pickles_with_its_window_and_no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-never-pickled")
    fs = retrying_s3(90)
    blob = pickle.dumps(fs)
    assert b"secret-never-pickled" not in blob
    back = pickle.loads(blob)
    assert back.handler == RetryingS3Handler(90) and back.handler.window_s == 90 and back.equals(fs)
    local = retrying_s3(30, pafs.LocalFileSystem())  # over a given filesystem: pickled with it
    back = pickle.loads(pickle.dumps(local))
    assert back.handler.window_s == 30 and back.handler.inner.equals(pafs.LocalFileSystem()) and back.equals(local)
