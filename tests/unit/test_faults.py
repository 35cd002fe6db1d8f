"""mtorl.faults: off unless enabled, loud on a typo, and the crash fault fires once at its step only."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtorl import faults


def test_every_fault_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    assert not any(faults.enabled(n) for n in faults.FAULTS)
    assert faults.int_value("train.nan_at_step") == -1
    faults.maybe_crash_worker(4, 1, 2)  # returns: nothing enabled


def test_env_enables_named_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(*faults.env({"train.nan_at_step": 5, "tune.kill_driver_after_trial": True}))
    assert faults.int_value("train.nan_at_step") == 5
    assert faults.enabled("tune.kill_driver_after_trial") and not faults.enabled("train.crash_at_step")


@pytest.mark.parametrize("raw,match", [
    ('{"train.nan_at_stp": 5}', "unknown fault"),
    ("train.nan_at_step=5", "not JSON"),
    ("[1]", "JSON object"),
])
def test_a_bad_setting_is_an_error_not_a_silently_disabled_fault(monkeypatch: pytest.MonkeyPatch, raw: str,
                                                                   match: str) -> None:
    monkeypatch.setenv(faults.ENV, raw)
    with pytest.raises(faults.FaultSpecError, match=match):
        faults.enabled("train.nan_at_step")
    with pytest.raises(faults.FaultSpecError, match="unknown fault"):
        faults.env({"nope": 1})


def test_crash_fires_only_on_the_last_rank_at_its_step_and_once(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    exits: list[int] = []
    monkeypatch.setattr(faults.os, "_exit", exits.append)
    monkeypatch.setenv(*faults.env({"train.crash_at_step": 4, "train.crash_marker": str(marker)}))
    faults.maybe_crash_worker(3, 1, 2)  # another step
    faults.maybe_crash_worker(4, 0, 2)  # not the last rank
    assert exits == [] and not marker.exists()
    faults.maybe_crash_worker(4, 1, 2)
    assert exits == [1] and marker.read_text() == "4"
    faults.maybe_crash_worker(4, 1, 2)  # the marker exists: a restarted worker carries on
    assert exits == [1]
    monkeypatch.setenv(*faults.env({"train.crash_at_step": 4}))
    with pytest.raises(faults.FaultSpecError, match="train.crash_marker"):
        faults.maybe_crash_worker(4, 1, 2)
