"""``mtorl bench --device cuda`` without a GPU: one clear line, exit 2, nothing started or written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtorl import bench
from mtorl.cli import bench_main


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_bench_fails_with_one_line_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    rc = bench_main(
        ["--device", "cuda", "--stages", "train", "--no-markdown", "--out", str(out), "--work", str(tmp_path / "w")]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "--device cuda: no CUDA device" in err, err
    assert not (out / "results-cuda.json").exists() and not (tmp_path / "w").exists()


def test_cuda_bench_uses_one_rank_per_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    b = bench.Bench(bench.QUICK, "cuda", tmp_path, print)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert b.train_workers() == (1,)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert b.train_workers() == (1, 2)
    assert bench.Bench(bench.QUICK, "cpu", tmp_path, print).train_workers() == (1, 2)
    assert bench.batch_size("cuda") > bench.batch_size("cpu")


@pytest.mark.parametrize("flags, says", [
    (["--serve-modes", "proxy,grpc"], "--serve-modes: unknown or no mode grpc"),
    (["--train-workers", "2"], "--train-workers 2: must include 1"),
])
def test_bench_subset_flags_are_checked_before_anything_starts(
        flags: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    rc = bench_main([*flags, "--no-markdown", "--out", str(out), "--work", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not out.exists() and not (tmp_path / "w").exists()


def test_a_subset_of_serve_modes_or_worker_counts_is_a_partial_run(tmp_path: Path) -> None:
    assert bench.SuiteOptions(serve_modes=("proxy",)).partial and bench.SuiteOptions(train_workers=(1,)).partial
    assert bench.SuiteOptions(stages=("train",)).partial and not bench.SuiteOptions().partial
    b = bench.Bench(bench.QUICK, "cpu", tmp_path, print)
    b.workers = (1,)
    assert b.train_workers() == (1,)
