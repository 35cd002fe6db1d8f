"""Test-session settings shared by unit and integration tests.

Integration fixtures (a real SeaweedFS store and a real local Ray) live in tests/fixtures/ and start
on free loopback ports; they are stopped by PID at the end of the session.
"""

import os
from pathlib import Path

import pytest

for _k, _v in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    # One math thread per process: the suite runs in parallel processes (pytest-xdist) on 2 cores, and
    # torch's OpenMP threads spin-wait when oversubscribed (a 12 s test took 150 s of CPU that way).
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_k, _v)

pytest_plugins = ["tests.fixtures.store", "tests.fixtures.ray", "tests.fixtures.datasets"]

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# The slowest files first (each file runs in one process: `--dist loadfile`), so the parallel run
# does not end waiting on one long file that started last. Measured with `--durations`; order only.
SLOW_FIRST = ("test_tune.py", "test_train.py", "test_bench_quick.py", "test_secrets.py", "test_outage.py",
              "test_console_wandb.py", "test_serve.py", "test_serve_haproxy.py", "test_submit.py", "test_online.py",
              "test_store.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(SLOW_FIRST)))  # stable: file order kept otherwise


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared sample datasets beside the checkout; skips when absent (a fresh clone elsewhere)."""
    if not (SHARED_DATA / "kuairand_sequence.csv.gz").exists():
        pytest.skip(f"shared sample data not found at ../shared/data (looked in {SHARED_DATA})")
    return SHARED_DATA
