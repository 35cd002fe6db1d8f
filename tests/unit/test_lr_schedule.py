"""TrainerSpec.lr_schedule: the per-epoch learning rate, the same in the Ray worker loop and in process."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from mtorl.spec.models import TrainerSpec
from mtorl.training.step import epoch_lr, set_lr


def test_constant_keeps_the_rate() -> None:
    assert [epoch_lr(0.01, "constant", e, 5) for e in range(5)] == [0.01] * 5


def test_cosine_starts_at_the_rate_and_decays_to_near_zero() -> None:
    rates = [epoch_lr(0.02, "cosine", e, 4) for e in range(4)]
    assert rates[0] == pytest.approx(0.02)
    assert rates == pytest.approx([0.02 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    assert all(a > b for a, b in zip(rates, rates[1:]))  # strictly decreasing
    assert rates[-1] == pytest.approx(0.02 * 0.5 * (1 - math.cos(math.pi / 4)))  # last epoch > 0: it still trains


def test_set_lr_changes_every_group() -> None:
    w = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [w[0]]}, {"params": [w[1]]}], lr=1.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_spec_refuses_an_unknown_schedule_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="lr_schedule"):
        TrainerSpec(lr_schedule="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        epoch_lr(0.1, "linear", 0, 3)
