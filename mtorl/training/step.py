"""Plain PyTorch training and validation steps (no Ray): the worker glue calls these.

Losses come from ``mtorl.training.losses.compute_loss``; the optimizer step is kept apart from it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from mtorl.errors import MtorlError
from mtorl.models import Batch
from mtorl.spec.models import ObjectiveSpec
from mtorl.training.losses import compute_loss


class NonFiniteLossError(MtorlError, RuntimeError):
    """Raised when a loss becomes NaN/inf; the last good checkpoint is kept."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside a DDP wrapper (``.module``) and/or ``torch.compile`` (``._orig_mod``)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def dist_backend(use_gpu: bool) -> str:
    """Process-group backend: NCCL only handles CUDA tensors, so a GPU group also gets gloo for CPU
    tensors (object collectives and metric sums pick gloo; DDP's gradient buckets on CUDA pick NCCL)."""
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, bf16: bool | None = None) -> Any:
    """bf16 autocast on a GPU that supports it; full precision otherwise (CPU, or a GPU without bf16).

    bf16 has float32's exponent range, so no GradScaler is needed (and none is used); float16, which
    would need one, is never chosen."""
    if device.type == "cuda" and (bf16_supported(device) if bf16 is None else bf16):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def epoch_lr(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) of ``epochs`` (``TrainerSpec.lr_schedule``)."""
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    raise ValueError(f"unknown lr_schedule {schedule!r}: constant or cosine")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def place_for_training(
    model: torch.nn.Module,
    device: torch.device,
    make_optimizer: Callable[[Iterator[torch.nn.Parameter]], torch.optim.Optimizer],
    optimizer_state: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """Move ``model`` to ``device``, THEN build its optimizer, THEN load a resumed optimizer state.

    The order matters: ``Optimizer.load_state_dict`` casts each state tensor to the device of its
    parameter at load time, so state loaded before the model moves stays on the CPU while the
    parameters go to the GPU, and the first AdamW step fails on mixed devices."""
    model.to(device)
    optimizer = make_optimizer(model.parameters())
    if optimizer_state is not None:
        optimizer.load_state_dict(dict(optimizer_state))
    return optimizer


def to_device(nb: Mapping[str, np.ndarray], device: torch.device) -> Batch:
    """A numpy batch as a ``Batch`` on ``device``. For CUDA: built on the CPU, copied into pinned
    (page-locked) memory and sent with ``non_blocking=True`` so the copy overlaps the GPU's work.
    Pinning is CUDA-only (it needs a CUDA driver, and gains nothing for a CPU device)."""
    if device.type != "cuda":
        return Batch.from_numpy(nb, device=device)
    cpu = Batch.from_numpy(nb, device="cpu")
    return Batch(**{f.name: getattr(cpu, f.name).pin_memory().to(device, non_blocking=True) for f in fields(Batch)})


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile`` the model in place (``nn.Module.compile``: same module, same state_dict keys,
    so checkpoints are unchanged) when ``enabled``."""
    if enabled:
        model.compile()
    return model


def gather_all(x: np.ndarray) -> np.ndarray:
    """Concatenate an array from every worker (validation metrics are over all shards)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return np.concatenate(parts)


def sum_all(values: dict[str, float]) -> dict[str, float]:
    """Sum scalars over every worker: a CPU float64 tensor, so the group needs a CPU backend (gloo;
    see ``dist_backend``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


@dataclass
class StepStats:
    """Running sums of losses weighted by valid steps."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    windows: int = 0

    def add(self, losses: dict[str, torch.Tensor], n_steps: int, n_windows: int) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach()) * n_steps
        self.steps += n_steps
        self.windows += n_windows

    def means(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{k}": v / max(self.steps, 1) for k, v in self.sums.items()}


def train_batches(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, np.ndarray]],
    objective: ObjectiveSpec,
    binary: bool,
    device: torch.device,
    grad_clip: float,
    max_steps: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> StepStats:
    """One pass over ``batches``; raises NonFiniteLossError on a NaN/inf loss."""
    model.train()
    stats = StepStats()
    for i, nb in enumerate(batches):
        if max_steps is not None and i >= max_steps:
            break
        batch = to_device(nb, device)
        with autocast(device):
            out = model(batch)
            losses = compute_loss(unwrap(model), out, batch, objective, binary)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite loss {float(loss)} at batch {i} ({ {k: float(v) for k, v in losses.items()} })")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        after = getattr(unwrap(model), "after_step", None)
        if callable(after):
            after()
        n_steps = int(batch.mask.sum())
        stats.add(losses, n_steps, int(batch.mask.shape[0]))
        if on_step is not None:
            on_step(i, {k: float(v.detach()) for k, v in losses.items()})
    return stats


@dataclass
class ValOutputs:
    stats: StepStats
    channel: np.ndarray  # (N,) logged channel of valid steps
    action_probs: np.ndarray  # (N, C)
    reward: np.ndarray  # (N,) target reward
    reward_hat: np.ndarray  # (N,) predicted reward of the logged channel
    reward_pred: np.ndarray | None = None  # (N, C) predicted reward of every channel (decision metrics)
    cost: np.ndarray | None = None  # (N,) logged cost
    propensity: np.ndarray | None = None  # (N,) logged propensity, NaN when unknown


@torch.no_grad()
def validate_batches(
    model: torch.nn.Module,
    batches: Iterable[dict[str, np.ndarray]],
    objective: ObjectiveSpec,
    binary: bool,
    device: torch.device,
) -> ValOutputs:
    """Losses plus the valid-step predictions needed for cross-worker metrics."""
    model.eval()
    stats = StepStats()
    ch, probs, rew, rhat, rall, cost, prop = [], [], [], [], [], [], []
    core = unwrap(model)
    for nb in batches:
        batch = to_device(nb, device)
        with autocast(device):
            out = core(batch)
            losses = compute_loss(core, out, batch, objective, binary)
        stats.add(losses, int(batch.mask.sum()), int(batch.mask.shape[0]))
        p, r = core.predict(batch)
        m = batch.mask
        idx = batch.channel.clamp(min=0)
        ch.append(batch.channel[m].cpu().numpy())
        probs.append(p[m].float().cpu().numpy())
        rew.append(batch.reward[m].float().cpu().numpy())
        rhat.append(r.gather(-1, idx.unsqueeze(-1)).squeeze(-1)[m].float().cpu().numpy())
        rall.append(r[m].float().cpu().numpy())
        cost.append(batch.cost[m].float().cpu().numpy())
        prop.append(batch.propensity[m].float().cpu().numpy())
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape, np.float32)  # noqa: E731
    return ValOutputs(stats, cat(ch, (0,)).astype(np.int64), cat(probs, (0, 0)), cat(rew, (0,)), cat(rhat, (0,)),
                      cat(rall, (0, 0)), cat(cost, (0,)), cat(prop, (0,)))


# The validation metrics of every epoch are computed here in numpy, not with scikit-learn: importing
# sklearn.metrics costs about 2 CPU-seconds (it loads scipy), paid by every Train worker process, every
# in-process job and every sweep trial before its first validation. Both functions equal scikit-learn's
# (tests/unit/test_val_metrics.py compares them); the evaluation reports still use scikit-learn.

def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Binary ROC AUC, ties counted half (the Mann-Whitney U statistic over n_pos * n_neg), as
    scikit-learn's ``roc_auc_score``. ``y``: bool (N,) with both classes present; ``score``: (N,)."""
    y = np.asarray(y, dtype=bool)
    _, inv, counts = np.unique(np.asarray(score, dtype=np.float64), return_inverse=True, return_counts=True)
    midrank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct score, ties averaged
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    return float((midrank[inv.reshape(-1)][y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_f1(truth: np.ndarray, pred: np.ndarray, n_labels: int) -> float:
    """Mean over the labels 0..n_labels-1 of F1 = 2 tp / (2 tp + fp + fn), 0 where a label is in neither
    (scikit-learn's ``f1_score(average="macro", labels=range(n_labels), zero_division=0)``)."""
    truth, pred = np.asarray(truth, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    tp = np.bincount(truth[truth == pred], minlength=n_labels)[:n_labels].astype(np.float64)
    fp = np.bincount(pred, minlength=n_labels)[:n_labels] - tp
    fn = np.bincount(truth, minlength=n_labels)[:n_labels] - tp
    den = 2 * tp + fp + fn
    return float(np.mean(np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)))


def val_metrics(channel: np.ndarray, action_probs: np.ndarray, reward: np.ndarray, reward_hat: np.ndarray, binary: bool) -> dict[str, float]:
    """Metrics over the valid steps of ALL workers (call after gathering)."""
    out: dict[str, float] = {}
    if len(channel) == 0:
        return out
    pred = action_probs.argmax(-1)
    out["accuracy"] = float((pred == channel).mean())
    out["macro_f1"] = macro_f1(channel, pred, action_probs.shape[1])
    aucs = []
    for c in range(action_probs.shape[1]):
        y = channel == c
        if 0 < y.sum() < len(y):
            aucs.append(roc_auc(y, action_probs[:, c]))
    out["mean_auc"] = float(np.mean(aucs)) if aucs else math.nan
    y = reward > 0.5 if binary else reward
    if binary and 0 < y.sum() < len(y):
        out["reward_auc"] = roc_auc(y, reward_hat)
    elif not binary:
        out["reward_mse"] = float(np.mean((reward_hat - reward) ** 2))
    return out


def decision_val_metrics(channel: np.ndarray, action_probs: np.ndarray, reward: np.ndarray, reward_pred: np.ndarray,
                         cost: np.ndarray, propensity: np.ndarray, binary: bool, decision: Any) -> dict[str, float]:
    """Decision metrics over the valid steps of ALL workers (`evaluation.decision.decision_metrics`):
    select_rate@budget at ``decision.budget`` (the checkpoint/tuning objective ``val/select_rate@budget``),
    decision_penalty and, with logged propensities, decision_dr."""
    from mtorl.evaluation.decision import decision_metrics

    y = (reward > 0.5).astype(np.float64) if binary else reward
    return decision_metrics(channel, action_probs, y, reward_pred, cost, propensity, decision,
                            budget_fraction=decision.budget, penalty=decision.penalty)
