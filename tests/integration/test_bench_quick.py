"""`mtorl bench --quick` runs end to end (its own store and Ray, in a subprocess) and writes every stage.

No timing assertions: the numbers depend on the machine; BENCHMARKS.md records them. The sizes are
tiny (every stage, every code path, a fraction of the work): the quick mode's own sizes are for people.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtorl.bench import STAGES

pytestmark = pytest.mark.integration


def test_quick_bench_completes_and_writes_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    md = tmp_path / "BENCHMARKS.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "MTORL_STORE_DIR"))}
    # one Serve ingress and the 1-worker run: the other modes and worker counts go through the same stage code,
    # and have their own tests (test_serve_direct, test_serve_haproxy, test_train)
    tiny = ["--steps", "6000", "--requests", "16", "--epochs", "1", "--scale-steps", "3000,12000",
            "--serve-modes", "proxy", "--train-workers", "1"]
    proc = subprocess.run([sys.executable, "-m", "mtorl.bench", "--quick", *tiny, "--out", str(out),
                           "--markdown", str(md), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=900, cwd=Path(__file__).resolve().parents[2])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, tail
    res = json.loads((out / "results.json").read_text())
    assert set(STAGES) <= set(res["stages"]), res["stages"].keys()
    for name in STAGES:
        assert "error" not in res["stages"][name], (name, res["stages"][name])
        assert "ratio" in res["stages"][name], name
    assert res["sizes"]["steps"] == 6000 and res["sizes"]["scale"] == [3000, 12000] and res["sizes"]["requests"] == 16
    assert res["sizes"]["epochs"] == 1
    assert res["stages"]["serve"]["modes"] == ["proxy"] and set(res["stages"]["train"]["ours"]) == {"1w"}
    assert res["machine"]["cores"] and res["machine"]["torch"] and res["machine"]["ray"]
    text = md.read_text()
    assert "<!-- bench:cpu:start -->" in text and "| stage |" in text
