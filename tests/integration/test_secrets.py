"""No secret in any log: after a train, a 2-trial W&B sweep and a serve run, Ray's session folder and the
W&B folder hold no copy of the object-store secret key or the serve token (issue: runtime_env env_vars
are written to runtime_env_agent.log).

The sweep is also the suite's ASHA sweep: a grid of a learning rate that learns and one too small to,
where ASHA stops the second at its first rung, and each trial has one W&B run holding the epochs it ran.
A trial costs its actors' start-up (seconds of imports per process) far more than its steps, so the
suite runs each kind of sweep once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.datasets import TINY_MODEL
from tests.fixtures.wandb_files import offline_runs

from mtorl.spec import make_job

pytestmark = pytest.mark.integration

TOKEN_ENV = "MTORL_SECRETS_TEST_TOKEN"  # MTORL_ prefix: the kind of name that used to be forwarded
TOKEN = "tok-5e1c7d92b04a4f3e"


def _hits(root: Path, needles: dict[str, bytes]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                found += [f"{name} in {p}" for name, n in needles.items() if n in data]
        except OSError:  # sockets, files removed while walking
            continue
    return found


def test_sweep_has_one_wandb_run_per_trial_and_no_secret_or_token_reaches_the_logs(
    ray_session: None, s3_store: Any, tiny_dataset: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray
    from ray import serve

    from mtorl.serving.app import run_serve
    from mtorl.training.driver import run_train
    from mtorl.tuning.sweep import run_tune

    wandb_dir = tmp_path / "wandb"
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    base = {
        "data": tiny_dataset,
        "output": f"{s3_bucket}/runs",
        "window": {"length": 10},
        "model": TINY_MODEL,
        "trainer": {"workers": 1, "epochs": 1, "batch_size": 32, "max_steps_per_epoch": 4},
        "tracking": {"wandb": "offline"},
    }
    ckpt = run_train(make_job("TrainJob", "secrets-train", base), progress=print)["best_checkpoint"]
    # A 2-trial grid sweep with W&B offline and ASHA: one W&B run per trial (and none from a callback),
    # holding the epochs the trial ran. Grid order: a learning rate that learns first, then one too small
    # to learn, cut at the first rung (epoch 1 of 2: ASHA's rungs with grace period 1 and reduction factor
    # 2), so it never reaches "completed". The same run is this test's tune step: a trial's actors get
    # their environment whatever the number of trials.
    sweep = make_job(
        "TuneJob",
        "wb-sweep",
        {
            "base": {**base, "trainer": {**base["trainer"], "epochs": 2, "max_steps_per_epoch": 3}},
            "output": f"{s3_bucket}/sweeps",
            "algorithm": "grid",
            "early_stopping": "asha",
            "parameters": {"trainer.lr": {"type": "categorical", "values": [0.03, 1e-9]}},
            "objective": {"metric": "val/loss", "mode": "min"},
        },
    )
    lines: list[str] = []
    res = run_tune(sweep, progress=lines.append)
    assert res["trials"] == 2 and res["failed_trials"] == 0
    states = {r["config"]["trainer.lr"]: r["state"] for r in res["leaderboard"]}
    assert states == {0.03: "completed", 1e-9: "stopped early"}
    trials = {f"wb-sweep-{r['trial']}".replace("_", "-"): r for r in res["leaderboard"]}
    runs = [x for x in offline_runs(wandb_dir) if x.run_id != "secrets-train"]
    assert sorted(x.run_id for x in runs) == sorted(trials)
    for x in runs:
        assert x.group == "wb-sweep"
        cfg = trials[x.run_id]["config"]
        assert x.config["trainer"]["lr"] == pytest.approx(cfg["trainer.lr"])
        rows = [h for h in x.history if "train/loss" in h]
        # the stopped trial's worker may log its next epoch before Tune's stop reaches it
        epochs = [r["train/epoch"] for r in rows]
        assert epochs == [0, 1] if cfg["trainer.lr"] == 0.03 else epochs in ([0], [0, 1]), rows
        assert all({"val/loss", "train/epoch"} <= set(r) for r in rows)
    done = [ln for ln in lines if ln.startswith("trials: ")]
    assert [ln.split(" [")[0] for ln in done] == ["trials: 1/2", "trials: 2/2"] and "best val/loss" in done[-1]
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        run_serve(
            make_job("ServeJob", "secrets-serve", {"checkpoint": ckpt, "port": port, "auth_token_env": TOKEN_ENV}),
            blocking=False,
            progress=print,
        )
        import httpx

        assert (
            httpx.get(
                f"http://127.0.0.1:{port}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
            ).status_code
            == 200
        )
    finally:
        serve.shutdown()

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    needles = {"AWS_SECRET_ACCESS_KEY": s3_store.secret_key.encode(), TOKEN_ENV: TOKEN.encode()}
    assert (session / "logs").is_dir()
    assert wandb_dir.is_dir() and any(wandb_dir.rglob("*")), "the W&B run wrote nothing: the check would be empty"
    hits = _hits(session, needles) + _hits(wandb_dir, needles)
    assert hits == [], "\n".join(hits[:20])
