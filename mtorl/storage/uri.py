"""URIs (``s3://bucket/key`` or a local path) -> clients, and the few operations mtorl needs.

S3 operations go through boto3 (clear error codes); :func:`resolve` hands pyarrow a filesystem for
Ray Data / Ray Train. Every failure is a :class:`StorageError` whose one line names the URI.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pyarrow import fs as pafs

from mtorl.storage.errors import StorageError
from mtorl.storage.settings import S3Settings, boto3_client, pyarrow_s3, s3_settings

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                     "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}


# ------------------------------------------------------------------------------------- parsing

def is_s3(uri: str | os.PathLike[str]) -> bool:
    return str(uri).startswith("s3://")


def _split(uri: str) -> tuple[str, str]:
    """``s3://b/a/c`` -> ("b", "a/c")."""
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI (expected s3://bucket/key)")
    return bucket, key.strip("/")


def _local(uri: str | os.PathLike[str]) -> Path:
    s = str(uri)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return Path(s).expanduser().absolute()


def resolve(uri: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """``s3://b/k`` -> (S3FileSystem, "b/k"); a local path or ``file://`` -> (LocalFileSystem, abs path)."""
    s = str(uri)
    if is_s3(s):
        bucket, key = _split(s)
        return pyarrow_s3(), f"{bucket}/{key}" if key else bucket
    if "://" in s and not s.startswith("file://"):
        raise StorageError(f"{s}: unsupported URI scheme (use s3://bucket/key or a local path)")
    return pafs.LocalFileSystem(), str(_local(s))


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """Append path parts with ``/`` (keeps the scheme): ``join("s3://b/x", "y", "z.json")``."""
    out = str(uri).rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


# ------------------------------------------------------------------------------------- errors

def _error(uri: str, exc: BaseException, settings: S3Settings | None = None) -> StorageError:
    """Translate a boto3/botocore exception into one line naming ``uri`` (never the secret)."""
    from botocore import exceptions as bx

    st = settings or s3_settings()
    where = st.where
    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        if code in _CREDENTIAL_CODES:
            return StorageError(f"{uri}: the object store at {where} refused the credentials ({code}); "
                                f"check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (keys from {st.source})")
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: the bucket {_split(uri)[0]!r} does not exist at {where}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{uri}: not found at {where}")
        msg = str(exc.response.get("Error", {}).get("Message", "")).splitlines()[0:1]
        return StorageError(f"{uri}: the object store at {where} answered {code}"
                            + (f": {msg[0]}" if msg else ""))
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
        return StorageError(f"{uri}: cannot reach the object store at {where} "
                            f"(is it running? `mtorl store up` starts the embedded one)")
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return StorageError(f"{uri}: no object-store credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                            f"(and AWS_ENDPOINT_URL_S3) or run `mtorl store up`")
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StorageError(f"{uri}: {type(exc).__name__}: {first}")


RETRY_ENV = "MTORL_STORAGE_RETRY_S"
_TRANSIENT_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


def retry_window_s() -> float:
    """How long object-store calls wait out an outage: ``$MTORL_STORAGE_RETRY_S`` (training sets 90 s for its
    driver and workers); 0 (unset) elsewhere, so a command run against a store that is down fails at once."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV) or 0))
    except ValueError:
        return 0.0


def _transient(e: BaseException) -> bool:
    """A store that doesn't answer (connection refused/reset, timeouts) or answers 5xx: worth waiting for."""
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return str(err.get("Code")) in _TRANSIENT_CODES or status.startswith("5")
    from boto3 import exceptions as b3

    if isinstance(e, (b3.S3UploadFailedError, b3.RetriesExceededError)):  # s3transfer wraps the real error
        text = str(e)
        return any(w in text for w in ("Could not connect", "Connection", "connection", "timed out", "(500)", "(502)",
                                       "(503)", "(504)", "InternalError", "ServiceUnavailable", "SlowDown"))
    return isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                          bx.ConnectionClosedError, bx.ConnectionError))


def retrying(fn: Any, *args: Any, window_s: float | None = None, **kw: Any) -> Any:
    """``fn(*args, **kw)``, retried with backoff (1, 2, 4 ... 10 s) on transient errors for ``window_s``
    (default :func:`retry_window_s`); the last error is raised as is."""
    import time

    window = retry_window_s() if window_s is None else window_s
    deadline, delay = time.monotonic() + window, 1.0
    while True:
        try:
            return fn(*args, **kw)
        except Exception as e:
            if not _transient(e) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _s3_call(uri: str, fn: Any, *args: Any, **kw: Any) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError

    from boto3.exceptions import Boto3Error

    window = retry_window_s()
    try:
        return retrying(fn, *args, **kw)
    except (ClientError, BotoCoreError, Boto3Error) as e:
        err = _error(uri, e)
        if window and _transient(e):
            err = StorageError(f"{err} (still failing after waiting {window:.0f} s)")
        raise err from None


# ------------------------------------------------------------------------------------- buckets

def _create_bucket(uri: str, bucket: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    st = s3_settings()
    c = boto3_client(st)
    kw: dict[str, Any] = {"Bucket": bucket}
    if st.endpoint is None and st.region != "us-east-1":
        kw["CreateBucketConfiguration"] = {"LocationConstraint": st.region}
    try:
        retrying(c.create_bucket, **kw)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise _error(uri, e) from None
    except BotoCoreError as e:
        raise _error(uri, e) from None


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an ``s3://`` URI if it is missing (no-op for local paths)."""
    from botocore.exceptions import BotoCoreError, ClientError

    uri = str(uri)
    if not is_s3(uri):
        return
    bucket, _ = _split(uri)
    try:
        retrying(boto3_client().head_bucket, Bucket=bucket)
        return
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
            raise _error(uri, e) from None
    except BotoCoreError as e:
        raise _error(uri, e) from None
    _create_bucket(uri, bucket)


def _with_bucket(uri: str, fn: Any, *args: Any, **kw: Any) -> Any:
    """Run an S3 write; on NoSuchBucket create the bucket and retry once."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return retrying(fn, *args, **kw)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise _error(uri, e) from None
    except BotoCoreError as e:
        raise _error(uri, e) from None
    _create_bucket(uri, _split(uri)[0])
    return _s3_call(uri, fn, *args, **kw)


# ------------------------------------------------------------------------------------- bytes/json

def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The whole object/file; StorageError naming the URI when it is missing or unreadable."""
    s = str(uri)
    if is_s3(s):
        bucket, key = _split(s)
        body = _s3_call(s, boto3_client().get_object, Bucket=bucket, Key=key)["Body"]
        return _s3_call(s, body.read)
    p = _local(s)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{s}: not found ({p})") from None
    except OSError as e:
        raise StorageError(f"{s}: cannot read: {e.strerror or e}") from None


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> None:
    """Write atomically: a local temp file + ``os.replace``; on S3 a single PUT. Creates dirs/bucket."""
    s = str(uri)
    if is_s3(s):
        bucket, key = _split(s)
        if not key:
            raise StorageError(f"{s}: no key to write to (expected s3://bucket/key)")
        _with_bucket(s, boto3_client().put_object, Bucket=bucket, Key=key, Body=bytes(data))
        return
    p = _local(s)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise StorageError(f"{s}: cannot write: {e.strerror or e}") from None


def read_json(uri: str | os.PathLike[str]) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except ValueError as e:
        raise StorageError(f"{uri}: not valid JSON ({e})") from None


def write_json(uri: str | os.PathLike[str], obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def exists(uri: str | os.PathLike[str]) -> bool:
    """True if the object/file exists, or (S3) anything exists under ``uri/`` ("directory"). A store that
    doesn't answer is waited for (:func:`retry_window_s`), then a StorageError: never a silent False."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return bool(retrying(_exists, uri))
    except (ClientError, BotoCoreError) as e:  # transient, and the window is spent
        raise _error(str(uri), e) from None


def _exists(uri: str | os.PathLike[str]) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    s = str(uri)
    if not is_s3(s):
        return _local(s).exists()
    bucket, key = _split(s)
    c = boto3_client()
    try:
        if key:
            try:
                c.head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
                    raise
            r = c.list_objects_v2(Bucket=bucket, Prefix=key + "/", MaxKeys=1)
            return bool(r.get("KeyCount", 0))
        c.head_bucket(Bucket=bucket)
        return True
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
            return False
        if _transient(e):
            raise  # retried by exists()
        raise _error(s, e) from None
    except BotoCoreError as e:
        if _transient(e):
            raise
        raise _error(s, e) from None


# ------------------------------------------------------------------------------------- trees

def _iter_s3(uri: str) -> Iterator[str]:
    """Keys under ``uri`` treated as a directory prefix. The whole listing is retried as one call (a
    paginator that failed half-way can't be resumed: retrying ``next`` on it would end the list early)."""
    bucket, key = _split(uri)
    prefix = f"{key}/" if key else ""

    def listing() -> list[str]:
        pages = boto3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    yield from _s3_call(uri, listing)


def list_files(uri: str | os.PathLike[str]) -> list[str]:
    """Every file under ``uri`` (recursive), as sorted URIs of the same kind. Missing dir -> []."""
    s = str(uri)
    if is_s3(s):
        bucket, _ = _split(s)
        return sorted(f"s3://{bucket}/{k}" for k in _iter_s3(s) if not k.endswith("/"))
    root = _local(s)
    if not root.is_dir():
        return []
    base = s.rstrip("/")
    out = [join(base, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file()]
    return sorted(out)


def delete_prefix(uri: str | os.PathLike[str]) -> None:
    """Delete everything under ``uri`` (a directory or a prefix); missing -> no-op."""
    s = str(uri)
    if is_s3(s):
        bucket, _ = _split(s)
        if not exists(f"s3://{bucket}"):
            return
        keys = list(_iter_s3(s))
        c = boto3_client()
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[i:i + 1000]]
            r = _s3_call(s, c.delete_objects, Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
            if r.get("Errors"):
                e = r["Errors"][0]
                raise StorageError(f"{s}: could not delete {e.get('Key')}: {e.get('Code')}")
        return
    p = _local(s)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def upload_dir(local_dir: str | os.PathLike[str], uri: str | os.PathLike[str]) -> None:
    """Copy a local directory tree to ``uri`` (S3 prefix or local directory)."""
    src = _local(local_dir)
    s = str(uri)
    if not src.is_dir():
        raise StorageError(f"{local_dir}: not a directory")
    if not is_s3(s):
        try:
            shutil.copytree(src, _local(s), dirs_exist_ok=True)
        except OSError as e:
            raise StorageError(f"{s}: cannot copy {src}: {e}") from None
        return
    ensure_bucket(s)
    bucket, key = _split(s)
    c = boto3_client()
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        dest = f"{key}/{rel}" if key else rel
        _s3_call(join(s, rel), c.upload_file, str(f), bucket, dest)


def download_dir(uri: str | os.PathLike[str], local_dir: str | os.PathLike[str]) -> None:
    """Copy everything under ``uri`` into ``local_dir`` (created). Nothing there -> StorageError."""
    s = str(uri)
    dst = _local(local_dir)
    if not is_s3(s):
        src = _local(s)
        if not src.is_dir():
            raise StorageError(f"{s}: not found (not a directory)")
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    bucket, key = _split(s)
    keys = [k for k in _iter_s3(s) if not k.endswith("/")]
    if not keys:
        raise StorageError(f"{s}: not found (nothing under this prefix)")
    c = boto3_client()
    for k in keys:
        rel = k[len(key) + 1:] if key else k
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _s3_call(f"s3://{bucket}/{k}", c.download_file, bucket, k, str(target))
