"""The mtorl console script against a real SeaweedFS: clear one-line errors, no secrets in outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.datasets import JOURNEYS_FORMAT, write_journeys_csv

pytestmark = pytest.mark.integration


def _mtorl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A user's shell, not this test process: a training run earlier in the process set the storage retry
    # window for itself (MTORL_STORAGE_RETRY_S), and with it a missing bucket is re-checked for 90 s.
    base = {k: v for k, v in os.environ.items() if k != "MTORL_STORAGE_RETRY_S"}
    return subprocess.run([sys.executable, "-m", "mtorl", *args], capture_output=True, text=True, timeout=300,
                          env={**base, **(env or {})})


def _prepare_args(csv: Path, out: str) -> list[str]:
    return ["prepare", "--source", "journeys", "--input", str(csv), "--output", out,
            "--set", f"spec.journeys={json.dumps(JOURNEYS_FORMAT)}"]


def test_prepare_via_cli_writes_result_without_secrets(s3_store: Any, s3_bucket: str, tmp_path: Path) -> None:
    csv = write_journeys_csv(tmp_path / "j.csv", users=30)
    res = tmp_path / "result.json"
    r = _mtorl(*_prepare_args(csv, f"{s3_bucket}/ds"), "--result", str(res))
    assert r.returncode == 0, r.stderr
    out = json.loads(res.read_text())
    assert out["rows_read"] == out["rows_written"] + sum(out["rows_dropped"].values())
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for text in (r.stdout, r.stderr, res.read_text()):
        assert secret not in text


def test_wrong_credentials_one_clear_line(s3_store: Any, s3_bucket: str, tmp_path: Path) -> None:
    csv = write_journeys_csv(tmp_path / "j.csv", users=10)
    r = _mtorl(*_prepare_args(csv, f"{s3_bucket}/ds2"), env={"AWS_SECRET_ACCESS_KEY": "definitely-wrong"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and s3_bucket in lines[0] and "refused the credentials" in lines[0], r.stderr
    assert "definitely-wrong" not in r.stdout + r.stderr


def test_reading_a_missing_bucket_is_a_clear_error(s3_store: Any) -> None:
    r = _mtorl("evaluate", "--checkpoint", "s3://no-such-bucket-mtorl/runs/x", "--output", "s3://no-such-bucket-mtorl/rep")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no-such-bucket-mtorl" in r.stderr


def test_missing_manifest_is_a_clear_error(s3_store: Any, s3_bucket: str) -> None:
    r = _mtorl("prepare", "--source", "journeys", "--input", "nope.csv", "--output", f"{s3_bucket}/x")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope.csv" in r.stderr
