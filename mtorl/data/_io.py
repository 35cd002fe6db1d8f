"""The storage calls the data layer needs, from ``mtorl.storage``.

Until ``mtorl.storage`` provides them, a local-only stand-in with the same signatures is used so the
data layer can be built and tested on local directories. Remove the stand-in once it lands.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import pyarrow.fs as pafs

try:
    from mtorl import storage as _storage

    if not hasattr(_storage, "resolve"):  # an empty package directory
        raise ImportError("mtorl.storage is not implemented yet")
except ImportError:
    _storage = None


class _LocalStorageError(Exception):
    """Stand-in for mtorl.storage.StorageError."""


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


if _storage is not None:
    StorageError = _storage.StorageError
    resolve = _storage.resolve
    join = _storage.join
    read_bytes = _storage.read_bytes
    write_bytes = _storage.write_bytes
    read_json = _storage.read_json
    write_json = _storage.write_json
    exists = _storage.exists
else:
    StorageError = _LocalStorageError  # type: ignore[misc]

    def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
        if _is_s3(uri):
            raise StorageError(f"{uri}: s3:// needs mtorl.storage")
        return pafs.LocalFileSystem(), os.path.abspath(uri)

    def join(uri: str, *parts: str) -> str:
        out = uri.rstrip("/")
        for p in parts:
            out = f"{out}/{p.strip('/')}"
        return out

    def read_bytes(uri: str) -> bytes:
        try:
            with open(resolve(uri)[1], "rb") as f:
                return f.read()
        except OSError as e:
            raise StorageError(f"{uri}: {e.strerror or e}") from None

    def write_bytes(uri: str, data: bytes) -> None:
        path = resolve(uri)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def read_json(uri: str) -> Any:
        return json.loads(read_bytes(uri))

    def write_json(uri: str, obj: Any) -> None:
        write_bytes(uri, json.dumps(obj, indent=1, sort_keys=True).encode())

    def exists(uri: str) -> bool:
        return os.path.exists(resolve(uri)[1])
