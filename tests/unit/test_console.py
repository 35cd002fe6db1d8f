"""mtorl's console: stage lines with timings, progress as plain lines off a terminal, W&B run ids."""

import io
import re

from mtorl.console import Console, as_console, ray_log_level
from mtorl.training.tracking import wandb_run_id

CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # any control character but the newline


def test_progress_off_a_terminal_is_one_plain_line_per_step() -> None:
    out = io.StringIO()
    con = Console(out, tty=False)
    with con.stage("train"):
        with con.progress(3, "epochs", unit="epoch") as bar:
            for i in range(3):
                bar.update(1, postfix=f"loss {1.0 / (i + 1):.4f}")
    lines = out.getvalue().splitlines()
    assert lines[0] == "== train" and re.fullmatch(r"-- train: done in \d+\.\d s", lines[-1])
    assert [ln.split(" [")[0] for ln in lines[1:-1]] == ["epochs: 1/3", "epochs: 2/3", "epochs: 3/3"]
    assert "loss 0.3333" in lines[3] and "<" in lines[3]  # elapsed<remaining (the ETA)
    assert not CONTROL.search(out.getvalue())


def test_a_line_budget_keeps_evenly_spaced_lines_and_the_last() -> None:
    out = io.StringIO()
    con = Console(out, tty=False)
    con.plain_lines = 4
    with con.progress(10, "epochs", unit="epoch") as bar:
        for _ in range(10):
            bar.update(1)
    assert [ln.split(" [")[0] for ln in out.getvalue().splitlines()] == [
        "epochs: 3/10", "epochs: 6/10", "epochs: 9/10", "epochs: 10/10"]


def test_progress_takes_the_callers_eta() -> None:
    out = io.StringIO()
    Console(out, tty=False).progress(3, "epochs").update(1, postfix="x", eta_s=75)
    assert re.fullmatch(r"epochs: 1/3 \[00:0\d<01:15, x\]\n", out.getvalue())


def test_progress_on_a_terminal_is_a_tqdm_bar() -> None:
    out = io.StringIO()
    con = Console(out, tty=True)
    with con.progress(2, "trials", unit="trial") as bar:
        bar.update(1)
        con("a line above the bar")
        bar.update(1)
    assert "\r" in out.getvalue() and "a line above the bar" in out.getvalue() and "2/2" in out.getvalue()


def test_a_failed_stage_says_so_and_raises() -> None:
    out = io.StringIO()
    con = Console(out, tty=False)
    try:
        with con.stage("serve"):
            raise RuntimeError("no port")
    except RuntimeError:
        pass
    assert re.fullmatch(r"-- serve: failed after \d+\.\d s", out.getvalue().splitlines()[-1])


def test_a_plain_callback_gets_the_lines() -> None:
    got: list[str] = []
    con = as_console(got.append)
    con.progress(2, "epochs").update(1, postfix="x")
    assert len(got) == 1 and got[0].startswith("epochs: 1/2 [") and got[0].endswith(", x]")


def test_log_level_env(monkeypatch) -> None:
    monkeypatch.delenv("MTORL_LOG_LEVEL", raising=False)
    assert ray_log_level(False) is None and ray_log_level(True) == "INFO"
    monkeypatch.setenv("MTORL_LOG_LEVEL", "debug")
    assert ray_log_level(False) == "DEBUG"


def test_wandb_run_id_is_stable_and_valid() -> None:
    a, b = wandb_run_id("demo-sim-sweep-26a81-00000"), wandb_run_id("demo-sim-sweep-26a81-00001")
    assert a == "demo-sim-sweep-26a81-00000" and a != b and wandb_run_id("demo-sim-sweep-26a81-00000") == a
    long = wandb_run_id("x" * 100 + ".y")
    assert len(long) <= 64 and re.fullmatch(r"[A-Za-z0-9_-]+", long) and long != wandb_run_id("x" * 100 + ".z")
