"""Bad store and endpoint inputs are one line, before anything starts."""

from __future__ import annotations

import pytest

from mtorl.cli import store_command
from mtorl.storage import StorageError, s3_settings, seaweed


def test_port_out_of_range_and_unusable_dir_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(StorageError, match=r"^--port 70000: not a TCP port \(1-65535\)$"):
        seaweed.up("/nonexistent-never", 70000)
    assert store_command("up", "/proc/mtorl-x", None) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: /proc/mtorl-x: cannot use this store directory:") and "\n" not in err


@pytest.mark.parametrize("argv, start", [
    (["--dir", "/proc/mtorl-x"], "error: /proc/mtorl-x: cannot use this store directory:"),
    (["--port", "70000"], "error: --port 70000: not a TCP port (1-65535)"),
])
def test_store_errors_follow_the_cli_convention(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                start: str) -> None:
    """``mtorl store`` failures read like every other command's: one ``error:`` line on stderr, exit 2."""
    from mtorl.cli import main

    assert main(["store", "up", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("value", ["not-a-url", "ftp://h:1", "http://", "http://h:99999", "127.0.0.1:8333"])
def test_an_endpoint_that_is_not_a_url_is_one_line(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", value)
    with pytest.raises(StorageError, match=r"^AWS_ENDPOINT_URL_S3='.*': not an endpoint URL"):
        s3_settings()


def test_weed_gets_no_aws_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    env = seaweed.clean_env()
    assert not any(k.startswith("AWS_") for k in env) and "PATH" in env
