"""Secrets never travel in a runtime_env: the filter, the 0600 file, and how settings read it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from mtorl.storage import credentials
from mtorl.storage.settings import s3_settings

ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE1",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-xyz",
    "AWS_REGION": "eu-west-1",
    "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
    "MTORL_STORE_DIR": "/x",
    "MTORL_SERVE_TOKEN": "tok-abcdef",
    "MTORL_OTHER": "tok-abcdef",
    "WANDB_API_KEY": "wandb-key-123",
    "WANDB_MODE": "offline",
    "HOME": "/h",
}


@pytest.fixture
def cred_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(credentials.DIR_ENV, str(tmp_path / "creds"))
    return tmp_path / "creds"


def test_forwardable_env_has_no_secret_and_points_at_a_0600_file(cred_dir: Path) -> None:
    out = credentials.forwardable_env(("AWS_", "MTORL_", "WANDB_"), ENV, also_secret=("MTORL_OTHER",))
    assert out["AWS_REGION"] == "eu-west-1" and out["WANDB_MODE"] == "offline" and out["MTORL_STORE_DIR"] == "/x"
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "WANDB_API_KEY",
        "MTORL_SERVE_TOKEN",
        "MTORL_OTHER",
        "HOME",
    ):
        assert name not in out
    blob = json.dumps(out)
    for secret in ("AKIDEXAMPLE1", "s3cr3t-value-xyz", "wandb-key-123", "tok-abcdef"):
        assert secret not in blob
    path = Path(out[credentials.FILE_ENV])
    assert path.parent == cred_dir
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(cred_dir.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE1",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-xyz",
        "WANDB_API_KEY": "wandb-key-123",
    }
    # the same secrets reuse the same file; no secret -> no file
    assert credentials.forwardable_env(("AWS_",), ENV)[credentials.FILE_ENV] == str(path)
    assert credentials.FILE_ENV not in credentials.forwardable_env(("AWS_",), {"AWS_REGION": "x"})


def test_a_worker_reads_its_keys_from_the_file(cred_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = credentials.write_file(
        {"AWS_ACCESS_KEY_ID": "AKIDFILE", "AWS_SECRET_ACCESS_KEY": "file-secret", "WANDB_API_KEY": "wk"}
    )
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv(credentials.FILE_ENV, path)
    s = s3_settings()
    assert (s.access_key, s.secret_key, s.endpoint) == ("AKIDFILE", "file-secret", "http://127.0.0.1:9")
    assert s.source == f"file:{path}" and "file-secret" not in repr(s)
    credentials.export_to_environ()
    assert os.environ["WANDB_API_KEY"] == "wk"


def test_a_missing_credentials_file_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mtorl.storage import StorageError

    monkeypatch.setenv(credentials.FILE_ENV, str(tmp_path / "gone.json"))
    with pytest.raises(StorageError, match=r"credentials file .*gone.json \(MTORL_CREDENTIALS_FILE\): cannot be read"):
        s3_settings()


def test_init_ray_passes_no_secret_in_its_runtime_env(cred_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from mtorl import raycluster

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MTORL_MY_BEARER", "bearer-value-9")
    raycluster.init_ray(address="127.0.0.1:1", secret_env=("MTORL_MY_BEARER",), quiet=False)
    env = seen["runtime_env"]["env_vars"]
    blob = json.dumps(seen, default=str)
    for secret in ("AKIDEXAMPLE1", "s3cr3t-value-xyz", "wandb-key-123", "tok-abcdef", "bearer-value-9"):
        assert secret not in blob
    assert env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9" and Path(env[credentials.FILE_ENV]).is_file()


def test_a_local_ray_tells_its_processes_its_dashboard(cred_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train's placement-group cleaner finds the State API from the environment; without it, another
    Ray on the machine makes it fail ("Found multiple active Ray instances")."""
    import ray

    from mtorl import raycluster

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    raycluster.init_ray(quiet=False)
    assert seen["address"] == "local" and seen["dashboard_host"] == "127.0.0.1"
    env = seen["runtime_env"]["env_vars"]
    assert env[raycluster.API_SERVER_ENV] == f"http://127.0.0.1:{seen['dashboard_port']}"


def test_submit_stages_the_secrets_in_a_0600_file_not_the_env(
    cred_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mtorl.jobs import CREDENTIALS_PATH, prepare_submission
    from mtorl.spec import make_job

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    job = make_job("SimulateJob", "s", {"output": "s3://b/sim"})
    sub = prepare_submission(job, tmp_path / "stage")
    env = sub.runtime_env["env_vars"]
    blob = json.dumps(sub.runtime_env)
    for secret in ("AKIDEXAMPLE1", "s3cr3t-value-xyz", "wandb-key-123", "tok-abcdef"):
        assert secret not in blob
    assert env[credentials.FILE_ENV] == CREDENTIALS_PATH and env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9"
    f = tmp_path / "stage" / CREDENTIALS_PATH
    assert (
        stat.S_IMODE(f.stat().st_mode) == 0o600
        and json.loads(f.read_text())["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value-xyz"
    )
    none = prepare_submission(job, tmp_path / "stage2", credentials=False)
    assert (
        credentials.FILE_ENV not in none.runtime_env["env_vars"]
        and not (tmp_path / "stage2" / CREDENTIALS_PATH).exists()
    )


def test_secrets_out_of_environ_for_tune(cred_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.tune.execution.class_cache import _ActorClassCache

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(credentials.FILE_ENV, raising=False)
    seen: dict[str, Any] = {}

    import ray

    monkeypatch.setattr(ray, "remote", lambda **kw: (seen.update(kw), lambda cls: cls)[1])
    with credentials.secrets_out_of_environ():
        _ActorClassCache().get(object)  # what Tune does for every trial
        assert s3_settings().secret_key == "s3cr3t-value-xyz"  # this process still reaches the store
    blob = json.dumps(seen)
    assert "s3cr3t-value-xyz" not in blob and "AKIDEXAMPLE1" not in blob and "PL_DISABLE_FORK" in blob
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value-xyz" and credentials.FILE_ENV not in os.environ


def test_the_keyless_filesystem_pickles_without_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    from mtorl.storage import pyarrow_s3, pyarrow_s3_keyless

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(credentials.FILE_ENV, raising=False)
    assert b"s3cr3t-value-xyz" in pickle.dumps(pyarrow_s3())  # why Tune must not get this one
    lazy = pyarrow_s3_keyless()
    blob = pickle.dumps(lazy)
    assert b"s3cr3t-value-xyz" not in blob and b"AKIDEXAMPLE1" not in blob
    assert pickle.loads(blob).type_name == "py::mtorl-s3"  # rebuilt from this process's settings
