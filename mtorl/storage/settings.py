"""Object-store settings: the standard AWS variables, else the embedded store's state file.

Resolution order (first hit wins):
0. ``$MTORL_CREDENTIALS_FILE``: a 0600 file with the keys, how Ray workers get them (a ``runtime_env``
   would put them in Ray's logs; see :mod:`mtorl.storage.credentials`).
1. ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``); endpoint from
   ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (none = real AWS S3).
2. ``$MTORL_STORE_DIR/state.json`` (default ``~/.mtorl/store``), written by ``mtorl store up``.
3. Nothing: keys are left to boto3 / pyarrow's own default chain (profiles, instance roles).
The region is ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else the state file's, else ``us-east-1``.
An endpoint variable always overrides the state file's endpoint.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from mtorl.storage import credentials

DEFAULT_REGION = "us-east-1"


def store_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The embedded store's directory: ``path``, else ``$MTORL_STORE_DIR``, else ``~/.mtorl/store``."""
    if path is not None:
        return Path(path).expanduser().resolve()
    env = os.environ.get("MTORL_STORE_DIR")
    return Path(env).expanduser().resolve() if env else Path.home() / ".mtorl" / "store"


@dataclass(frozen=True)
class S3Settings:
    """How to reach the object store. ``endpoint`` None means real AWS S3. Secrets never show in repr."""

    endpoint: str | None = None
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    region: str = DEFAULT_REGION
    session_token: str | None = field(default=None, repr=False)
    source: str = "default"  # "env", "state:<path>" or "default": where the keys came from

    def __repr__(self) -> str:
        secret = "***" if self.secret_key else None
        return (
            f"S3Settings(endpoint={self.endpoint!r}, access_key={self.access_key!r}, "
            f"secret_key={secret!r}, region={self.region!r}, source={self.source!r})"
        )

    __str__ = __repr__

    @property
    def where(self) -> str:
        """Human name of the store for error messages."""
        return self.endpoint or f"AWS S3 ({self.region})"


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_endpoint(endpoint: str | None) -> str | None:
    """An endpoint must be ``http(s)://host[:port]``: anything else is one line naming the variable."""
    if endpoint is None:
        return None
    from mtorl.storage.errors import StorageError

    name = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    try:
        u = urlparse(endpoint)
        port_ok = u.port is None or 0 < u.port < 65536
    except ValueError:
        port_ok = False
        u = urlparse("")
    if u.scheme not in ("http", "https") or not u.hostname or not port_ok:
        raise StorageError(f"{name}={endpoint!r}: not an endpoint URL (http://host:port or https://host)")
    return endpoint


def s3_settings() -> S3Settings:
    """Resolve the settings from the environment now (cheap; clients are cached per settings)."""
    env = os.environ
    endpoint = _check_endpoint(env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None)
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    sources: list[tuple[Mapping[str, str], str]] = []
    if env.get(credentials.FILE_ENV):
        sources.append((credentials.read_file(), f"file:{env[credentials.FILE_ENV]}"))
    sources.append((env, "env"))
    for keys, source in sources:
        if keys.get("AWS_ACCESS_KEY_ID") and keys.get("AWS_SECRET_ACCESS_KEY"):
            return S3Settings(endpoint, keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"],
                              region or DEFAULT_REGION, keys.get("AWS_SESSION_TOKEN") or None, source)
    state_path = store_dir() / "state.json"
    state = _read_state(state_path)
    if state and state.get("access_key") and state.get("secret_key"):
        return S3Settings(
            endpoint or state.get("endpoint"),
            state["access_key"],
            state["secret_key"],
            region or state.get("region") or DEFAULT_REGION,
            None,
            f"state:{state_path}",
        )
    return S3Settings(endpoint, None, None, region or DEFAULT_REGION, None, "default")


@functools.lru_cache(maxsize=16)
def _boto3_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"max_attempts": 4, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": "path"} if settings.endpoint else {},
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=settings.endpoint,
        aws_access_key_id=settings.access_key,
        aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        region_name=settings.region,
        config=cfg,
    )


def boto3_client(settings: S3Settings | None = None) -> Any:
    """A boto3 S3 client for ``settings`` (default: :func:`s3_settings`), cached per settings."""
    return _boto3_client(settings or s3_settings())


@functools.lru_cache(maxsize=16)
def _pyarrow_s3(settings: S3Settings) -> Any:
    from pyarrow import fs as pafs

    kw: dict[str, Any] = {"region": settings.region}
    if settings.access_key and settings.secret_key:
        kw.update(access_key=settings.access_key, secret_key=settings.secret_key)
        if settings.session_token:
            kw["session_token"] = settings.session_token
    if settings.endpoint:
        u = urlparse(settings.endpoint if "://" in settings.endpoint else f"http://{settings.endpoint}")
        kw.update(endpoint_override=u.netloc, scheme=u.scheme or "http")
    return pafs.S3FileSystem(**kw)


def pyarrow_s3(settings: S3Settings | None = None) -> Any:
    """A ``pyarrow.fs.S3FileSystem`` for ``settings`` (default: :func:`s3_settings`), cached."""
    return _pyarrow_s3(settings or s3_settings())


def _handler_base() -> type:
    from pyarrow import fs as pafs

    return pafs.FileSystemHandler


class _LazyS3Handler(_handler_base()):  # type: ignore[misc]
    """A pyarrow ``FileSystemHandler`` over :func:`pyarrow_s3` that pickles without the keys: unpickled
    (in a Tune trial, or from Tune's saved experiment state) it resolves the settings again where it runs."""

    def _fs(self) -> Any:
        return pyarrow_s3()

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_LazyS3Handler, ())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LazyS3Handler)

    def __hash__(self) -> int:
        return hash(_LazyS3Handler)

    def equals(self, other: Any) -> bool:
        return isinstance(other, _LazyS3Handler)

    def get_type_name(self) -> str:
        return "mtorl-s3"

    def normalize_path(self, path: str) -> str:
        return str(self._fs().normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[Any]:
        return list(self._fs().get_file_info(paths))

    def get_file_info_selector(self, selector: Any) -> list[Any]:
        return list(self._fs().get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._fs().create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._fs().delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._fs().delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("mtorl-s3: refusing to delete the contents of the root")

    def delete_file(self, path: str) -> None:
        self._fs().delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._fs().move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._fs().copy_file(src, dest)

    def open_input_stream(self, path: str) -> Any:
        return self._fs().open_input_stream(path)

    def open_input_file(self, path: str) -> Any:
        return self._fs().open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        return self._fs().open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        return self._fs().open_append_stream(path, metadata=metadata)


def pyarrow_s3_keyless() -> Any:
    """A filesystem that works like :func:`pyarrow_s3` but pickles without the keys (each process that
    unpickles it resolves its own settings: environment, ``MTORL_CREDENTIALS_FILE`` or the store's state
    file). For objects Ray persists: Tune pickles its ``storage_filesystem`` into the experiment state."""
    from pyarrow import fs as pafs

    return pafs.PyFileSystem(_LazyS3Handler())
