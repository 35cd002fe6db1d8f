"""Secrets reach Ray workers through a 0600 file, never through a ``runtime_env``.

Ray writes a ``runtime_env``'s ``env_vars`` in plaintext to ``runtime_env_agent.log`` (and keeps a job's
in its job table), so the environment mtorl forwards to workers is filtered by
:func:`forwardable_env`: names that look secret are dropped, and the secrets themselves go to a file
with mode 0600 (in a 0700 folder) whose *path* is passed as ``MTORL_CREDENTIALS_FILE``. Workers read it
in :func:`mtorl.storage.settings.s3_settings` (object-store keys) and :func:`export_to_environ`
(``WANDB_API_KEY``). A local cluster's workers also inherit the variables from the raylet's own process
environment, which Ray does not log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

FILE_ENV = "MTORL_CREDENTIALS_FILE"
DIR_ENV = "MTORL_CREDENTIALS_DIR"
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY")
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "API_KEY", "APIKEY", "CREDENTIAL", "PRIVATE")


def looks_secret(name: str) -> bool:
    """True for the known secret variables and any name that reads like one (``*_TOKEN``, ``*SECRET*``...)."""
    up = name.upper()
    if up == FILE_ENV:
        return False
    return up in SECRET_NAMES or any(w in up for w in _SECRET_WORDS)


def credentials_dir() -> Path:
    """``$MTORL_CREDENTIALS_DIR``, else ``~/.mtorl/credentials``; created 0700."""
    raw = os.environ.get(DIR_ENV)
    d = Path(raw).expanduser() if raw else Path.home() / ".mtorl" / "credentials"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


def write_file(values: Mapping[str, str]) -> str:
    """Write ``values`` to a 0600 JSON file (named by a digest of its content, so reruns reuse it); its path."""
    body = json.dumps(dict(sorted(values.items()))).encode()
    path = credentials_dir() / f"env-{hashlib.sha256(body).hexdigest()[:20]}.json"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    return str(path)


def read_file(path: str | None = None) -> dict[str, str]:
    """The secrets in ``path`` (default: ``$MTORL_CREDENTIALS_FILE``); {} when none is configured."""
    path = path or os.environ.get(FILE_ENV)
    if not path:
        return {}
    from mtorl.storage.errors import StorageError

    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise StorageError(f"credentials file {path} ({FILE_ENV}): cannot be read: {e.strerror or e}") from None
    except ValueError:
        raise StorageError(f"credentials file {path} ({FILE_ENV}): not JSON") from None
    if not isinstance(data, dict):
        raise StorageError(f"credentials file {path} ({FILE_ENV}): not a JSON object")
    return {k: str(v) for k, v in data.items() if k in SECRET_NAMES and v}


def forwardable_env(prefixes: tuple[str, ...], environ: Mapping[str, str] | None = None,
                    also_secret: Iterable[str] = ()) -> dict[str, str]:
    """The variables under ``prefixes`` that may travel in a ``runtime_env`` (Ray logs them): no secret
    name, no secret value; when the environment holds secrets, ``MTORL_CREDENTIALS_FILE`` names a 0600
    file holding them instead."""
    env = os.environ if environ is None else environ
    extra = {n for n in also_secret if n}
    secrets = {k: env[k] for k in SECRET_NAMES if env.get(k)}
    secret_values = {v for k, v in env.items() if (k in extra or looks_secret(k)) and len(v) >= 4}
    out = {k: v for k, v in env.items()
           if k.startswith(prefixes) and not looks_secret(k) and k not in extra and v not in secret_values}
    if env.get(FILE_ENV):
        out[FILE_ENV] = os.path.abspath(env[FILE_ENV])
    elif secrets:
        out[FILE_ENV] = write_file(secrets)
    return out


def export_to_environ() -> None:
    """In a worker: set the secrets of ``$MTORL_CREDENTIALS_FILE`` that this process's environment lacks
    (``WANDB_API_KEY`` for W&B; the object-store keys are read by ``s3_settings`` directly)."""
    for k, v in read_file().items():
        if not k.startswith("AWS_"):  # the object-store keys stay out of the environment (Tune copies those)
            os.environ.setdefault(k, v)


@contextlib.contextmanager
def secrets_out_of_environ() -> Iterator[None]:
    """While inside: the secrets are out of ``os.environ`` (in a 0600 file named by ``MTORL_CREDENTIALS_FILE``,
    which this process's own storage calls then read). Ray Tune copies ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` from the driver's environment into every trial actor's runtime_env (logged,
    and saved in the experiment state): run ``Tuner.fit`` inside this."""
    saved = {k: os.environ[k] for k in SECRET_NAMES if k in os.environ}
    had_file = os.environ.get(FILE_ENV)
    if saved and not had_file:
        os.environ[FILE_ENV] = write_file({k: v for k, v in saved.items() if v})
    for k in saved:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        os.environ.update(saved)
        if had_file is None:
            os.environ.pop(FILE_ENV, None)
