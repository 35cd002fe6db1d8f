"""Models: shapes and masks, gradients, causality, padding invariance, determinism, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtorl.models import MODELS, Batch, build_model, receptive_field
from mtorl.models.baselines import bcq_filter, conditioned_returns_to_go, returns_to_go
from mtorl.models.export import export_torchscript
from mtorl.models.layers import TemporalConvNet
from mtorl.spec.models import ModelSpec, TCNSpec

D, C = 4, 3
NAMES = sorted(MODELS)
CAUSAL = ["mtorl", "bc_seq", "dt", "bc_mlp", "cql", "iql", "bcq", "logreg"]


def tiny_spec(name: str, dropout: float = 0.0, history_stats: bool = True, attention_layers: int = 1) -> ModelSpec:
    return ModelSpec(
        name=name,
        hidden=8,
        decoder_hidden=8,
        history_stats=history_stats,
        tcn={"levels": 2, "kernel_size": 2, "dropout": dropout},
        attention={"heads": 2, "layers": attention_layers, "dropout": dropout},
    )


def make_batch(lengths: list[int], L: int, seed: int = 0) -> Batch:
    """Right-padded windows with the given valid lengths."""
    rng = np.random.default_rng(seed)
    B = len(lengths)
    mask = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
    channel = np.where(mask, rng.integers(0, C, (B, L)), -1)
    prev = np.where(mask, np.concatenate([rng.integers(-1, C, (B, 1)), channel[:, :-1]], axis=1), -1)
    reward = np.where(mask, rng.random((B, L)), 0).astype(np.float32)
    prev_reward = np.where(mask, np.concatenate([np.zeros((B, 1)), reward[:, :-1]], axis=1), 0).astype(np.float32)
    done = mask & (np.arange(L)[None, :] == np.asarray(lengths)[:, None] - 1)
    state = (rng.normal(size=(B, L, D)) * mask[..., None]).astype(np.float32)
    return Batch.from_numpy(
        dict(
            state=state,
            prev_channel=prev,
            prev_reward=prev_reward,
            channel=channel,
            reward=reward,
            gain=reward,
            cost=np.zeros((B, L), np.float32),
            propensity=np.full((B, L), np.nan, np.float32),
            done=done,
            mask=mask,
        )
    )


def model(name: str, dropout: float = 0.0, binary: bool = True, history_stats: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_spec(name, dropout, history_stats), state_dim=D, n_channels=C, binary=binary)


def test_batch_from_numpy_defaults_and_to() -> None:
    b = make_batch([3, 5], L=5)
    assert b.state.shape == (2, 5, D) and b.state.dtype == torch.float32
    assert b.channel.dtype == torch.int64 and b.mask.dtype == torch.bool and b.done.dtype == torch.bool
    inf = Batch.from_numpy({k: getattr(b, k).numpy() for k in ("state", "prev_channel", "prev_reward", "mask")})
    assert (inf.channel == -1).all() and torch.isnan(inf.propensity).all() and not inf.done.any()
    assert b.to("cpu").shape == (2, 5)
    with pytest.raises(KeyError):
        Batch.from_numpy({"state": b.state.numpy()})


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("binary", [True, False])
def test_shapes_masks_and_finite(name: str, binary: bool) -> None:
    m = model(name, binary=binary)
    b = make_batch([5, 2, 0], L=5)  # includes a fully padded window
    out = m(b)
    assert out.action_logits.shape == (3, 5, C) and out.reward_pred.shape == (3, 5, C)
    assert torch.isfinite(out.action_logits).all() and torch.isfinite(out.reward_pred).all()
    probs, reward = m.predict(b)
    assert probs.shape == (3, 5, C) and reward.shape == (3, 5, C)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 5), atol=1e-5)
    if binary:
        assert ((reward >= 0) & (reward <= 1)).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    from mtorl.spec.models import ObjectiveSpec
    from mtorl.training.losses import compute_loss

    m = model(name)
    b = make_batch([6, 4, 5, 2], L=6)
    losses = compute_loss(m, m(b), b, ObjectiveSpec(pref_weight=0.5), binary=True)
    losses["loss"].backward()
    missing = [
        n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, missing
    assert any(float(p.grad.abs().sum()) > 0 for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", CAUSAL)
def test_causality(name: str) -> None:
    m = model(name, dropout=0.3).eval()
    b = make_batch([8, 8], L=8)
    t = 4
    pert = Batch(
        **{
            **b.__dict__,
            "state": torch.where(torch.arange(8)[None, :, None] > t, b.state + 5.0, b.state),
            "prev_channel": torch.where(torch.arange(8)[None, :] > t, (b.prev_channel + 1) % C, b.prev_channel),
            "prev_reward": torch.where(torch.arange(8)[None, :] > t, 1.0 - b.prev_reward, b.prev_reward),
        }
    )
    o1, o2 = m(b), m(pert)
    assert torch.allclose(o1.action_logits[:, : t + 1], o2.action_logits[:, : t + 1], atol=1e-6)
    assert torch.allclose(o1.reward_pred[:, : t + 1], o2.reward_pred[:, : t + 1], atol=1e-6)
    assert not torch.allclose(o1.action_logits[:, t + 1 :], o2.action_logits[:, t + 1 :])
    p1, p2 = m.predict(b), m.predict(pert)
    for a, c in zip(p1, p2):
        assert torch.allclose(a[:, : t + 1], c[:, : t + 1], atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_padding_invariance(name: str) -> None:
    m = model(name).eval()
    b = make_batch([5, 3], L=5)
    pad = 4
    longer = Batch(
        **{
            k: torch.cat([v, torch.full((2, pad, *v.shape[2:]), -1 if v.dtype == torch.int64 else 0, dtype=v.dtype)], 1)
            for k, v in b.__dict__.items()
        }
    )
    mask = b.mask
    for a, c in zip(m.predict(b), m.predict(longer)):
        assert torch.allclose(a[mask], c[:, :5][mask], atol=1e-5)
    o1, o2 = m(b), m(longer)
    assert torch.allclose(o1.action_logits[mask], o2.action_logits[:, :5][mask], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_predict_is_deterministic_and_restores_mode(name: str) -> None:
    m = model(name, dropout=0.5).train()
    b = make_batch([6, 6], L=6)
    p1, r1 = m.predict(b)
    p2, r2 = m.predict(b)
    assert torch.equal(p1, p2) and torch.equal(r1, r2)
    assert m.training


def test_receptive_field_formula_and_tcn() -> None:
    assert receptive_field(ModelSpec()) == 1 + 2 * 2 * (1 + 2 + 4)  # defaults: 3 levels, k=3, d=1,2,4
    spec = TCNSpec(levels=2, kernel_size=2, dilations=[1, 2], dropout=0.0)
    rf = receptive_field(spec)
    assert rf == 7
    torch.manual_seed(0)
    tcn = TemporalConvNet(8, spec).eval()
    x = torch.randn(1, 12, 8)
    y = x.clone()
    y[:, 0] += 3.0
    diff = (tcn(x) - tcn(y)).abs().amax(-1)[0]  # (L,)
    assert diff[rf - 1] > 0 and torch.all(diff[rf:] == 0)


def test_polyak_target_update() -> None:
    m = model("cql")
    with torch.no_grad():
        for p in m.q_head.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.target["q_head"].parameters()]
    m.after_step()
    tau = m.spec.target_update_tau
    for b, pt, p in zip(before, m.target["q_head"].parameters(), m.q_head.parameters()):
        assert torch.allclose(pt, (1 - tau) * b + tau * p)
        assert not pt.requires_grad


def test_bcq_filter_hand_computed() -> None:
    q = torch.tensor([[[1.0, 5.0, 3.0]]])
    g = torch.log(torch.tensor([[[0.5, 0.1, 0.4]]]))  # ratios 1, 0.2, 0.8
    out = bcq_filter(q, g, threshold=0.3)
    assert out[0, 0, 0] == 1.0 and out[0, 0, 2] == 3.0 and out[0, 0, 1] < -1e8
    assert int(out.argmax(-1)) == 2


def test_returns_to_go_hand_computed() -> None:
    r = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    m = torch.tensor([[True, True, True, False]])
    assert torch.allclose(returns_to_go(r, m, 0.5), torch.tensor([[1.5, 1.0, 2.0, 0.0]]))
    prev = torch.tensor([[0.0, 1.0, 0.0]])  # r_{t-1}
    assert torch.allclose(conditioned_returns_to_go(prev, 2.0, 1.0), torch.tensor([[2.0, 1.0, 1.0]]))
    # (2-1)/.5=2, clipped
    assert torch.allclose(conditioned_returns_to_go(prev, 2.0, 0.5), torch.tensor([[2.0, 2.0, 2.0]]))


def test_dt_tracks_max_return_and_target() -> None:
    m = model("dt")
    assert m.target_return() == 1.0
    b = make_batch([4, 4], L=4)
    m.train()(b)
    expected = float(returns_to_go(b.reward, b.mask, m.spec.gamma).max())
    assert m.target_return() == pytest.approx(expected)
    m2 = build_model(tiny_spec("dt").model_copy(update={"dt_target_return": 3.0}), D, C, True)
    assert m2.target_return() == 3.0


@pytest.mark.parametrize("name", ["mtorl", "bc_seq", "cql"])
def test_torchscript_export_matches_eager(name: str) -> None:
    m = model(name, dropout=0.2)
    ts = export_torchscript(m, make_batch([6, 4], L=6))
    for b in (make_batch([6, 4], L=6, seed=1), make_batch([9, 2, 7], L=9, seed=2)):
        p, r = m.predict(b)
        p2, r2 = ts(b.state, b.prev_channel, b.prev_reward, b.mask)
        assert torch.allclose(p, p2, atol=1e-6) and torch.allclose(r, r2, atol=1e-6)


def test_every_model_is_listed_in_the_spec() -> None:
    from typing import get_args

    from mtorl.spec.models import ModelName

    assert set(MODELS) == set(get_args(ModelName))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stats", [True, False])
def test_every_model_honours_the_history_stats_switch(name: str, stats: bool) -> None:
    """One spec field gives every model the same inputs: on, the step input grows by the 2 + 2C
    history statistics (and the outputs read them); off, the model never sees them."""
    m = model(name, history_stats=stats)
    b = make_batch([6, 3], L=6)
    out = m(b)
    assert out.action_logits.shape == (2, 6, C) and out.reward_pred.shape == (2, 6, C)
    probs, reward = m.predict(b)
    assert probs.shape == (2, 6, C) and reward.shape == (2, 6, C)
    assert torch.isfinite(out.reward_pred).all() and torch.isfinite(out.action_logits).all()
    n_on = sum(p.numel() for p in model(name, history_stats=True).parameters())
    n_off = sum(p.numel() for p in model(name, history_stats=False).parameters())
    assert n_on > n_off  # the input projection is wider by (2 + 2C) columns
    # Earlier channels/rewards far back in the journey move the statistics at t but not x_t:
    # a model without memory and without the statistics cannot tell the two batches apart.
    if name in ("bc_mlp", "logreg"):
        t = 5
        pert = Batch(
            **{
                **b.__dict__,
                "prev_reward": torch.where(torch.arange(6)[None, :] < t - 1, 1.0 - b.prev_reward, b.prev_reward),
            }
        )
        m.eval()
        same = torch.allclose(m(b).reward_pred[0, t], m(pert).reward_pred[0, t], atol=1e-6)
        assert same is (not stats)


def test_mtorl_ablation_without_attention() -> None:
    torch.manual_seed(0)
    m = build_model(tiny_spec("mtorl", attention_layers=0), D, C, True)
    assert len(m.blocks) == 0
    out = m(make_batch([5, 2], L=5))
    assert out.reward_pred.shape == (2, 5, C)
    with pytest.raises(ValueError):  # heads must divide hidden only when attention is on
        ModelSpec(hidden=9, attention={"heads": 2, "layers": 1})
    ModelSpec(hidden=9, attention={"heads": 2, "layers": 0})


def test_logreg_is_linear_in_its_features_hand_computed() -> None:
    """r̂(φ, c) = w·φ + W_c·φ + b_c and π = softmax(Aφ + a), φ = step features (+ statistics)."""
    from mtorl.models.layers import step_features

    m = model("logreg")
    b = make_batch([4, 2], L=4)
    phi = step_features(b, C, True)  # (B, L, F)
    assert phi.shape[-1] == C + 1 + D + 2 + 2 * C
    out = m(b)
    w = m.reward_shared.weight[0]  # (F,)
    W, bias = m.reward_linear.weight, m.reward_linear.bias  # (C, F), (C,)
    expected = torch.einsum("blf,f->bl", phi, w)[..., None] + torch.einsum("blf,cf->blc", phi, W) + bias
    assert torch.allclose(out.reward_pred, expected, atol=1e-6)
    A, a = m.action_linear.weight, m.action_linear.bias
    assert torch.allclose(out.action_logits, torch.einsum("blf,cf->blc", phi, A) + a, atol=1e-6)
