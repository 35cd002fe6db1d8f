"""An ensemble of K trained models of one architecture (torch only, no Ray).

Its prediction is the mean of the members' predictions, in probability space:

    pi(c | h)  = (1/K) sum_k pi_k(c | h)          action probabilities          (B, L, C)
    rhat(h, c) = (1/K) sum_k rhat_k(h, c)         reward head (sigmoid for BCE)  (B, L, C)
    sd(h, c)   = sqrt((1/K) sum_k (rhat_k - rhat)^2)   the members' spread, a free uncertainty estimate

so an ensemble of one predicts exactly what its member does (sd = 0). The members differ only in
their training seed (``mtorl ensemble`` checks that they share the model spec, data and sizes); their
state dict keys are ``members.<k>.<name>``, so the checkpoint is one safetensors file.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mtorl.models.batch import Batch
from mtorl.models.layers import SequencePolicy


class Ensemble(nn.Module):
    """K members with the ``SequencePolicy.predict`` interface; ``predict`` is their mean."""

    def __init__(self, members: Sequence[SequencePolicy]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        first = members[0]
        for k, m in enumerate(members):
            if (m.name, m.n_channels, m.binary) != (first.name, first.n_channels, first.binary):
                raise ValueError(f"member {k} ({m.name}, {m.n_channels} channels, binary={m.binary}) differs from "
                                 f"member 0 ({first.name}, {first.n_channels} channels, binary={first.binary})")
        self.members = nn.ModuleList(members)
        self.policies: list[SequencePolicy] = list(members)  # the same modules, typed
        self.name: str = first.name
        self.spec = first.spec
        self.n_channels: int = first.n_channels
        self.binary: bool = first.binary

    def __len__(self) -> int:
        return len(self.members)

    @torch.no_grad()
    def predict_spread(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean action probs, mean reward, members' std of the reward), each (B, L, C)."""
        outs = [m.predict(batch) for m in self.policies]
        probs = torch.stack([p for p, _ in outs])    # (K, B, L, C)
        reward = torch.stack([r for _, r in outs])   # (K, B, L, C)
        return probs.mean(0), reward.mean(0), reward.std(0, correction=0)

    @torch.no_grad()
    def predict(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        probs, reward, _ = self.predict_spread(batch)
        return probs, reward


@torch.no_grad()
def predict_spread(model: SequencePolicy | Ensemble, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Ensemble.predict_spread`` for an ensemble; (probs, reward, zeros) for a single model."""
    if isinstance(model, Ensemble):
        return model.predict_spread(batch)
    probs, reward = model.predict(batch)
    return probs, reward, torch.zeros_like(reward)
