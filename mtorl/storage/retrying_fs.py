"""A pyarrow filesystem over S3 whose calls wait out a short store outage: for Ray Train's own storage calls.

With ``trainer.workers > 0`` Ray Train itself writes to the run's storage: each worker uploads its
checkpoint (``StorageContext.persist_current_checkpoint``: ``create_dir`` then ``pyarrow.fs.copy_files``),
the controller writes ``checkpoint_manager_snapshot.json`` and deletes pruned checkpoints, and a resumed run
reads them back. None of that goes through ``mtorl.storage``, and Ray Train retries none of it: a store that
is down for a few seconds while a checkpoint uploads fails the worker group. ``retrying_s3()`` is the
``RunConfig(storage_filesystem=...)`` that makes those calls retry with backoff, as mtorl's own storage calls
do (``mtorl.storage.uri.retrying``), for a window fixed when it is made.

* Metadata calls (info, list, create, delete, move, copy) are retried whole.
* An output stream is buffered and uploaded on ``close()``, so the upload can be retried whole (a
  half-written S3 object cannot be resumed). Checkpoints are megabytes, so the buffer is small.
* An input stream or file is read whole, with retries, and served from memory.

It wraps the filesystem it is given (Ray Train ships it to its controller and workers, as it did the
plain one), or, given none, pickles without keys like ``pyarrow_s3_keyless``. Only transient failures
are retried (connection refused or reset, timeouts, 5xx); anything else (a missing key, refused
credentials) is raised at once.
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from mtorl.storage.settings import _LazyS3Handler

T = TypeVar("T")
_TRANSIENT_WORDS = ("NETWORK_CONNECTION", "Could not connect", "Couldn't connect", "Connection refused",
                    "Connection reset", "connection reset", "timed out", "Timeout", "SERVICE_UNAVAILABLE",
                    "INTERNAL_FAILURE", "SLOW_DOWN", "HTTP response code: 5", "InternalError", "ServiceUnavailable",
                    "SlowDown", "curlCode: 7", "curlCode: 28", "curlCode: 52", "curlCode: 56")


def transient_os_error(e: BaseException) -> bool:
    """A pyarrow S3 error worth waiting for: the store did not answer, or answered 5xx."""
    if not isinstance(e, OSError) or isinstance(e, FileNotFoundError):
        return False
    return any(w in str(e) for w in _TRANSIENT_WORDS)


def retry_os(fn: Callable[[], T], window_s: float, sleep: Callable[[float], None] | None = None) -> T:
    """``fn()``, retried with backoff (1, 2, 4 ... 10 s) on transient pyarrow errors for ``window_s``; the
    last error is raised as is."""
    deadline, delay = time.monotonic() + window_s, 1.0
    while True:
        try:
            return fn()
        except OSError as e:
            if not transient_os_error(e) or time.monotonic() + delay > deadline:
                raise
            (sleep or time.sleep)(delay)
            delay = min(delay * 2, 10.0)


class _Upload:
    """A pyarrow ``NativeFile``-like output stream: bytes are buffered, uploaded whole (with retries) on close."""

    def __init__(self, handler: "RetryingS3Handler", path: str, metadata: Any):
        import pyarrow as pa

        self._handler, self._path, self._metadata = handler, path, metadata
        self._buf = pa.BufferOutputStream()
        self.closed = False

    def write(self, data: Any) -> int:
        return int(self._buf.write(data))

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return int(self._buf.tell())

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        data = self._buf.getvalue()

        def put() -> None:
            with self._handler._fs().open_output_stream(self._path, metadata=self._metadata) as out:
                out.write(data)
        retry_os(put, self._handler.window_s)


class RetryingS3Handler(_LazyS3Handler):
    """``_LazyS3Handler`` whose calls retry for ``window_s`` seconds: over ``inner`` (a pyarrow filesystem,
    pickled with it) or, without one, over the S3 settings resolved where it runs (pickled keyless)."""

    def __init__(self, window_s: float, inner: Any = None):
        super().__init__()
        self.window_s, self.inner = float(window_s), inner

    def _fs(self) -> Any:
        return self.inner if self.inner is not None else super()._fs()

    def __reduce__(self) -> tuple[Any, tuple[float, Any]]:  # type: ignore[override]
        return (RetryingS3Handler, (self.window_s, self.inner))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RetryingS3Handler) or other.window_s != self.window_s:
            return False
        if self.inner is None or other.inner is None:
            return self.inner is other.inner
        return bool(self.inner.equals(other.inner))

    def __hash__(self) -> int:
        return hash((RetryingS3Handler, self.window_s))

    def equals(self, other: Any) -> bool:
        return self == other

    def get_type_name(self) -> str:
        return "mtorl-s3-retrying"

    def _retry(self, fn: Callable[[], T]) -> T:
        return retry_os(fn, self.window_s)

    def get_file_info(self, paths: list[str]) -> list[Any]:
        return self._retry(lambda: list(self._fs().get_file_info(paths)))

    def get_file_info_selector(self, selector: Any) -> list[Any]:
        return self._retry(lambda: list(self._fs().get_file_info(selector)))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry(lambda: self._fs().create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._retry(lambda: self._fs().delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry(lambda: self._fs().delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_file(self, path: str) -> None:
        self._retry(lambda: self._fs().delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._retry(lambda: self._fs().move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._retry(lambda: self._fs().copy_file(src, dest))

    def _read_all(self, path: str) -> Any:
        import pyarrow as pa

        def get() -> Any:
            with self._fs().open_input_stream(path) as f:
                return f.read_buffer()
        return pa.BufferReader(self._retry(get))

    def open_input_stream(self, path: str) -> Any:
        return self._read_all(path)

    def open_input_file(self, path: str) -> Any:
        return self._read_all(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        import pyarrow as pa

        return pa.PythonFile(_Upload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        raise OSError("mtorl-s3-retrying: S3 objects cannot be appended to")


def retrying_s3(window_s: float, inner: Any = None) -> Any:
    """A ``pyarrow.fs.PyFileSystem`` whose calls wait out a store outage for ``window_s`` seconds, over
    ``inner`` (e.g. ``mtorl.storage.pyarrow_s3()``) or, keyless, over the S3 settings of whichever process
    uses it. For Ray Train's ``RunConfig(storage_filesystem=...)``."""
    from pyarrow import fs as pafs

    return pafs.PyFileSystem(RetryingS3Handler(window_s, inner))
