"""W&B tracking of a training run: one W&B run per mtorl run (per trial in a sweep), opened by rank 0.

The run id is derived from the job name; a sweep's trial is named ``<sweep>-<trial id>``, so its id
holds both, and a resumed run (a re-run with the same name, or a restored sweep's trial) continues
the same W&B run (``resume="allow"``). Logged metrics are the numeric, namespaced ones (``train/...``,
``val/...``); the W&B step is the global optimizer step. No Ray import here.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from typing import Any

MAX_ID = 64  # W&B run ids: letters, digits, '-' and '_'


def wandb_run_id(name: str) -> str:
    """A stable W&B run id for a run (job) name: the name itself where W&B allows it."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "run"
    if len(clean) <= MAX_ID:
        return clean
    return f"{clean[:MAX_ID - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def wandb_mode(tracking: Any) -> str:
    """The mode a run uses: ``WANDB_MODE`` when set (the environment wins, e.g. ``disabled`` in CI), else the spec's."""
    return os.environ.get("WANDB_MODE") or tracking.wandb


def open_run(job: Any, rank: int) -> Any:
    """The W&B run of ``job`` on rank 0 (None elsewhere, or when tracking is disabled)."""
    tr = job.spec.tracking
    mode = wandb_mode(tr)
    if rank != 0 or tr.wandb == "disabled" or mode == "disabled":
        return None
    import wandb

    wdir = os.environ.get("WANDB_DIR") or os.path.join(tempfile.gettempdir(), "mtorl-wandb")
    os.makedirs(wdir, exist_ok=True)
    return wandb.init(
        project=tr.project, entity=tr.entity, group=tr.group, name=job.metadata.name, id=wandb_run_id(job.metadata.name),
        resume="allow", mode=mode, dir=wdir, job_type="trial" if tr.group else "train",
        config={"job": job.metadata.name, **job.spec.model_dump(mode="json")},
        settings=wandb.Settings(console="off", x_disable_stats=True, x_save_requirements=False),
    )


def log_metrics(run: Any, metrics: dict[str, Any], step: int) -> None:
    """The epoch's numeric metrics; ``epoch`` is logged as ``train/epoch`` (the step is W&B's own)."""
    if run is None:
        return
    out = {k: v for k, v in metrics.items() if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if "epoch" in metrics:
        out["train/epoch"] = metrics["epoch"]
    run.log(out, step=step)
