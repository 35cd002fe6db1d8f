"""No secret in any log: after a 2-trial W&B sweep whose trials are Ray Train runs (which also checks one
W&B run per trial) and a serve run of its best checkpoint, Ray's session folder and the W&B folder hold no
copy of the object-store secret key or the serve token (issue: runtime_env env_vars are written to
runtime_env_agent.log). A trial builds its Ray Train run as ``mtorl train`` does (``build_trainer``: the
same worker runtime_env), inside the driver's environment with the secrets in it."""

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
    # A 2-trial sweep with W&B offline: one W&B run per trial (and none from a callback). Its trials are
    # this test's Ray Train runs (workers: 1): a trial's actors get their environment as a train job's do.
    sweep = make_job(
        "TuneJob",
        "wb-sweep",
        {
            "base": base,
            "output": f"{s3_bucket}/sweeps",
            "max_trials": 2,
            "algorithm": "random",
            "early_stopping": "none",
            "parameters": {"objective.reward_weight": {"type": "double", "min": 0.1, "max": 10.0, "log": True}},
            "objective": {"metric": "val/loss", "mode": "min"},
        },
    )
    lines: list[str] = []
    res = run_tune(sweep, progress=lines.append)
    assert res["trials"] == 2 and res["failed_trials"] == 0
    trials = {f"wb-sweep-{r['trial']}".replace("_", "-"): r for r in res["leaderboard"]}
    runs = offline_runs(wandb_dir)
    assert sorted(x.run_id for x in runs) == sorted(trials)
    for x in runs:
        assert x.group == "wb-sweep"
        cfg = trials[x.run_id]["config"]
        assert x.config["objective"]["reward_weight"] == pytest.approx(cfg["objective.reward_weight"])
        (row,) = [h for h in x.history if "train/loss" in h]
        assert {"val/loss", "train/epoch"} <= set(row)
    done = [ln for ln in lines if ln.startswith("trials: ")]
    assert [ln.split(" [")[0] for ln in done] == ["trials: 1/2", "trials: 2/2"] and "best val/loss" in done[-1]
    ckpt = res["best"]["checkpoint"]
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
