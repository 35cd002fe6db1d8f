"""A killed prepare's leftovers: `mtorl datasets gc` lists and removes uncommitted version folders; a failed
prepare removes its own; spill folders of dead prepares are swept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtorl.cli import main
from mtorl.data.errors import DataError
from mtorl.data.gc import orphaned_versions, stale_spill_dirs
from mtorl.data.prepare import prepare
from tests.unit.test_data_converters import JFMT, journeys_rows, quiet, spec, write_table


def _inp(tmp_path: Path) -> Path:
    rows = journeys_rows()
    return write_table(tmp_path / "j.csv", list(rows[0]), [list(r.values()) for r in rows])


def test_gc_lists_then_removes_only_uncommitted_versions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "ds"
    old = prepare(spec(tmp_path, "journeys", _inp(tmp_path), journeys=JFMT), progress=quiet).version
    cur = prepare(spec(tmp_path, "journeys", _inp(tmp_path), journeys=JFMT), progress=quiet).version
    killed = ds / "v20200101T000000Z-abcdef" / "train"   # what a SIGKILL mid-write leaves
    killed.mkdir(parents=True)
    (killed / "part-00000.parquet").write_bytes(b"partial")
    assert [o["version"] for o in orphaned_versions(str(ds))] == ["v20200101T000000Z-abcdef"]
    assert main(["datasets", "gc", str(ds)]) == 0
    out = capsys.readouterr().out
    assert f"orphaned {ds}/v20200101T000000Z-abcdef (1 files" in out and old not in out and cur not in out
    assert killed.exists()
    assert main(["datasets", "gc", str(ds), "--delete"]) == 0
    assert not killed.parent.exists() and (ds / old).is_dir() and (ds / cur).is_dir()
    assert json.loads((ds / "manifest.json").read_text())["version"] == cur


def test_a_failed_prepare_removes_its_version_folder(tmp_path: Path) -> None:
    rows = journeys_rows()
    rows[-1]["cost"] = -1.0  # the last row fails (on_bad_rows: error) after the first shards' rows are read
    inp = write_table(tmp_path / "j.csv", list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(DataError):
        prepare(spec(tmp_path, "journeys", inp, journeys=JFMT), progress=quiet)
    assert not any((tmp_path / "ds").glob("v*")) if (tmp_path / "ds").exists() else True


def test_spill_folders_of_dead_prepares_are_swept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f"mtorl-prepare-{pid}-x1"
    live = tmp_path / f"mtorl-prepare-{os.getpid()}-x2"
    stale.mkdir()
    live.mkdir()
    assert stale_spill_dirs(str(tmp_path)) == [stale]
    prepare(spec(tmp_path, "journeys", _inp(tmp_path), journeys=JFMT, spill_dir=str(tmp_path)), progress=quiet)
    assert not stale.exists() and live.exists()
    assert [p.name for p in tmp_path.glob("mtorl-prepare-*")] == [live.name]  # its own spill folder is gone too
