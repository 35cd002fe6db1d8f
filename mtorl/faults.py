"""Fault injection: a documented test hook, off unless explicitly enabled.

Tests prove that a crashed worker is restarted, that a NaN loss stops a run cleanly and that a sweep
whose driver dies resumes. They enable the fault they need through one environment variable, which
subprocesses and Ray workers inherit (the training driver forwards ``MTORL_*`` to its workers)::

    MTORL_FAULTS='{"train.crash_at_step": 4, "train.crash_marker": "/tmp/x/crashed"}'

The value is a JSON object of fault names to values. Unset (the default), every fault is off and a
call site costs one environment lookup. An unknown name is an error, so a typo can't silently turn a
fault test into one that passes without its fault. The faults:

- ``train.crash_at_step`` (int) with ``train.crash_marker`` (path): the last-rank training worker exits
  hard (``os._exit(1)``) at that global step, once: the marker file records that it happened.
- ``train.nan_at_step`` (int): the training batch of that global step gets NaN states.
- ``tune.kill_driver_after_trial`` (true): a sweep's trial SIGKILLs the sweep's driver process right
  after the trial wrote its best.json, before Tune records the trial as finished.

In tests, :func:`env` builds the variable: ``monkeypatch.setenv(*faults.env({"train.nan_at_step": 5}))``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

ENV = "MTORL_FAULTS"

FAULTS: dict[str, str] = {
    "train.crash_at_step": "int: the last-rank training worker exits hard at this global step (once)",
    "train.crash_marker": "path: the file that records the crash happened (required with train.crash_at_step)",
    "train.nan_at_step": "int: the training batch of this global step gets NaN states",
    "tune.kill_driver_after_trial": "true: the sweep driver is SIGKILLed right after a trial writes its best.json",
}


class FaultSpecError(ValueError):
    """``MTORL_FAULTS`` is set but is not a JSON object of known fault names."""


def env(faults: dict[str, Any]) -> tuple[str, str]:
    """``(name, value)`` of the environment variable that enables ``faults`` (checked here, not later)."""
    raw = json.dumps(faults)
    _parse(raw)
    return ENV, raw


@functools.lru_cache(maxsize=8)
def _parse(raw: str) -> dict[str, Any]:
    try:
        faults = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FaultSpecError(f'{ENV}: not JSON ({e.msg}); expected e.g. {{"train.nan_at_step": 5}}') from None
    if not isinstance(faults, dict):
        raise FaultSpecError(f"{ENV}: expected a JSON object of fault names, got {type(faults).__name__}")
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise FaultSpecError(f"{ENV}: unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return faults


def _active() -> dict[str, Any]:
    raw = os.environ.get(ENV)
    return _parse(raw) if raw else {}


def enabled(name: str) -> bool:
    """Whether fault ``name`` is enabled with a true value."""
    return bool(_active().get(name))


def int_value(name: str, default: int = -1) -> int:
    """Fault ``name``'s integer value, ``default`` when it is off (-1: matches no step)."""
    v = _active().get(name)
    return default if v is None else int(v)


def maybe_crash_worker(global_step: int, rank: int, world_size: int) -> None:
    """``train.crash_at_step``: the last rank exits hard at that step, once per marker file."""
    faults = _active()
    if not faults or faults.get("train.crash_at_step") is None:
        return
    marker = faults.get("train.crash_marker")
    if marker is None:
        raise FaultSpecError(f"{ENV}: train.crash_at_step needs train.crash_marker (the file that makes it once)")
    if int(faults["train.crash_at_step"]) != global_step or rank != max(0, world_size - 1) or Path(marker).exists():
        return
    Path(marker).write_text(str(global_step))
    print(f"[fault] train.crash_at_step: rank {rank} exits at step {global_step}", flush=True)
    os._exit(1)
