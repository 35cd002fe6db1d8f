"""MTORL and baselines: torch only (no Ray). ``build_model`` picks one by ``ModelSpec.name``."""

from __future__ import annotations

from mtorl.models.baselines import BCMLP, BCQ, CQL, IQL, BCSeq, DecisionTransformer, LogReg
from mtorl.models.batch import Batch, ModelOutput
from mtorl.models.layers import SequencePolicy, receptive_field
from mtorl.models.mtorl import MTORL
from mtorl.spec.models import ModelSpec

MODELS: dict[str, type[SequencePolicy]] = {
    c.name: c for c in (MTORL, BCMLP, BCSeq, CQL, IQL, BCQ, DecisionTransformer, LogReg)
}


def build_model(spec: ModelSpec, state_dim: int, n_channels: int, binary: bool) -> SequencePolicy:
    """The model named ``spec.name``; ``binary`` = reward head outputs logits (BCE) vs values (MSE)."""
    if spec.name not in MODELS:
        raise ValueError(f"unknown model {spec.name!r}; choose one of {sorted(MODELS)}")
    if state_dim < 1 or n_channels < 1:
        raise ValueError(f"need state_dim >= 1 and n_channels >= 1, got {state_dim}, {n_channels}")
    return MODELS[spec.name](spec, state_dim, n_channels, binary)


__all__ = ["Batch", "ModelOutput", "SequencePolicy", "MODELS", "build_model", "receptive_field", "MTORL"]
