"""Losses against hand-computed numbers, and the preference term's gradient direction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtorl.models import MODELS, Batch, build_model
from mtorl.spec.models import ModelSpec, ObjectiveSpec
from mtorl.training.losses import (
    action_loss,
    awr_weights,
    compute_loss,
    cql_loss,
    expectile_loss,
    masked_mean,
    preference_loss,
    reward_loss,
    sequence_log_likelihood,
    td_target,
    td_valid,
    window_returns,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def step_batch(reward: list[float], channel: list[int], done: list[bool], mask: list[bool]) -> Batch:
    """One window of explicit labels (inputs are zeros)."""
    L = len(reward)
    z = np.zeros((1, L), np.float32)
    return Batch.from_numpy(dict(
        state=np.zeros((1, L, 2), np.float32), prev_channel=np.full((1, L), -1), prev_reward=z,
        channel=np.array([channel]), reward=np.array([reward], np.float32), gain=z, cost=z,
        propensity=np.full((1, L), np.nan, np.float32), done=np.array([done]), mask=np.array([mask]),
    ))


def test_masked_mean_ignores_padding_and_empty() -> None:
    x = torch.tensor([[1.0, 3.0, 100.0]])
    assert masked_mean(x, torch.tensor([[True, True, False]])) == pytest.approx(2.0)
    assert masked_mean(x, torch.zeros(1, 3, dtype=torch.bool)) == 0.0


def test_action_loss_hand_computed() -> None:
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [50.0, -50.0]]])
    channel = torch.tensor([[1, 0, -1]])
    mask = torch.tensor([[True, True, False]])
    # step 0: -log 1/2; step 1: -log 3/4; step 2 is padding
    assert action_loss(logits, channel, mask) == pytest.approx((LN2 + math.log(4 / 3)) / 2, abs=1e-6)


def test_reward_loss_mse_and_bce_hand_computed() -> None:
    pred = torch.tensor([[[0.2, 0.9], [0.5, 0.1], [7.0, 7.0]]])
    channel = torch.tensor([[1, 0, -1]])
    reward = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    assert reward_loss(pred, channel, reward, mask, "mse") == pytest.approx((0.01 + 0.25) / 2, abs=1e-6)
    logits = torch.tensor([[[0.0, 0.0], [9.0, LN3], [0.0, 0.0]]])
    # step 0: BCE(σ(0)=1/2, 1) = ln 2; step 1: BCE(σ(9), 0) = softplus(9)
    expected = (LN2 + math.log1p(math.exp(9.0))) / 2
    assert reward_loss(logits, channel, reward, mask, "bce") == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError):
        reward_loss(pred, channel, reward, mask, "l1")  # type: ignore[arg-type]


def test_window_returns_and_log_likelihood() -> None:
    reward = torch.tensor([[1.0, 0.5, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.allclose(window_returns(reward, mask), torch.tensor([1.5, 0.0]))
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [0.0, 0.0]]] * 2)
    channel = torch.tensor([[0, 0, -1], [1, -1, -1]])
    ll = sequence_log_likelihood(logits, channel, mask)
    assert torch.allclose(ll, torch.tensor([(-LN2 + math.log(0.75)) / 2, -LN2]), atol=1e-6)


def pref_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # window 0: π(a)=1/2 (ℓ = −ln 2); window 1: π(a)=3/4 (ℓ = ln 3/4)
    logits = torch.tensor([[[0.0, 0.0]], [[LN3, 0.0]]])
    channel = torch.tensor([[0], [0]])
    mask = torch.ones(2, 1, dtype=torch.bool)
    return logits, channel, mask, torch.tensor([1.0, 0.0])  # window 0 wins


def test_preference_loss_hand_computed() -> None:
    logits, channel, mask, returns = pref_inputs()
    # −log σ(β (ℓ_w − ℓ_l)) = −log σ(ln(1/2) − ln(3/4)) = −log σ(ln 2/3) = −log 0.4
    assert preference_loss(logits, None, channel, mask, returns, beta=1.0) == pytest.approx(-math.log(0.4), abs=1e-6)
    # β = 2: σ(2 ln 2/3) = (4/9)/(1 + 4/9) = 4/13
    assert preference_loss(logits, None, channel, mask, returns, beta=2.0) == pytest.approx(-math.log(4 / 13), abs=1e-6)
    # reference = policy: the implicit reward margin is 0, loss = ln 2
    assert preference_loss(logits, logits.clone(), channel, mask, returns, beta=1.0) == pytest.approx(LN2, abs=1e-6)


def test_preference_loss_zero_when_undefined() -> None:
    logits, channel, mask, _ = pref_inputs()
    assert preference_loss(logits, None, channel, mask, torch.tensor([0.5, 0.5]), 1.0) == 0.0
    assert preference_loss(logits[:1], None, channel[:1], mask[:1], torch.tensor([1.0]), 1.0) == 0.0
    empty = torch.tensor([[True], [False]])  # the only other window has no valid step
    assert preference_loss(logits, None, channel, empty, torch.tensor([1.0, 0.0]), 1.0) == 0.0


def test_preference_loss_top_k_vs_bottom_k() -> None:
    torch.manual_seed(0)
    B = 8  # k = 2: best two paired with worst two
    logits = torch.randn(B, 3, 4)
    channel = torch.randint(0, 4, (B, 3))
    mask = torch.ones(B, 3, dtype=torch.bool)
    returns = torch.tensor([5.0, 1.0, 7.0, 0.0, 3.0, 2.0, 4.0, -1.0])
    ell = sequence_log_likelihood(logits, channel, mask)
    pairs = [(2, 7), (0, 3)]
    expected = sum(-torch.nn.functional.logsigmoid(0.5 * (ell[win] - ell[lose])) for win, lose in pairs) / 2
    assert preference_loss(logits, None, channel, mask, returns, beta=0.5) == pytest.approx(float(expected), abs=1e-6)


def test_preference_gradient_raises_winner_and_lowers_loser() -> None:
    logits, channel, mask, returns = pref_inputs()
    logits = logits.clone().requires_grad_(True)
    before = sequence_log_likelihood(logits, channel, mask).detach()
    preference_loss(logits, None, channel, mask, returns, beta=1.0).backward()
    with torch.no_grad():
        after = sequence_log_likelihood(logits - 0.1 * logits.grad, channel, mask)
    assert after[0] > before[0]  # winner's logged action more likely
    assert after[1] < before[1]  # loser's less likely


def test_td_target_and_validity_hand_computed() -> None:
    reward = torch.tensor([[1.0, 0.5, 0.2]])
    done = torch.tensor([[False, False, True]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    v = torch.tensor([[10.0, 20.0, 30.0]])
    assert torch.allclose(td_target(reward, done, mask, v, 0.5), torch.tensor([[11.0, 15.5, 0.2]]))
    cut = torch.tensor([[True, True, False]])  # window cut mid-journey: step 1 has no next state
    assert td_valid(torch.zeros(1, 3, dtype=torch.bool), cut).tolist() == [[True, False, False]]
    assert td_valid(done, mask).tolist() == [[True, True, True]]


def test_cql_loss_hand_computed() -> None:
    b = step_batch([0.5], [0], [True], [True])
    q = torch.tensor([[[1.0, 2.0]]])
    out = cql_loss(q, q.clone(), b, gamma=0.9, alpha=2.0)
    td = 0.5 * (1.0 - 0.5) ** 2  # terminal: y = r
    reg = math.log(math.e + math.e**2) - 1.0
    assert out["td_loss"] == pytest.approx(td) and out["cql_loss"] == pytest.approx(reg, abs=1e-6)
    assert out["q_loss"] == pytest.approx(td + 2.0 * reg, abs=1e-6)


def test_expectile_and_awr_weights() -> None:
    assert torch.allclose(expectile_loss(torch.tensor([2.0, -2.0]), 0.7), torch.tensor([2.8, 1.2]))
    w = awr_weights(torch.tensor([0.0, 1.0, 100.0]), beta=2.0)
    assert torch.allclose(w, torch.tensor([1.0, math.exp(2.0), 100.0]))


def test_compute_loss_mtorl_combines_terms() -> None:
    torch.manual_seed(0)
    spec = ModelSpec(hidden=8, decoder_hidden=8, attention={"heads": 2})
    m = build_model(spec, state_dim=2, n_channels=2, binary=True)
    rng = np.random.default_rng(0)
    B, L = 4, 3
    b = Batch.from_numpy(dict(
        state=rng.normal(size=(B, L, 2)).astype(np.float32), prev_channel=rng.integers(-1, 2, (B, L)),
        prev_reward=rng.random((B, L)).astype(np.float32), channel=rng.integers(0, 2, (B, L)),
        reward=(rng.random((B, L)) > 0.5).astype(np.float32), done=np.zeros((B, L), bool), mask=np.ones((B, L), bool),
    ))
    obj = ObjectiveSpec(reward_weight=0.7, pref_weight=0.3)
    out = m(b)
    losses = {k: v.detach() for k, v in compute_loss(m, out, b, obj, binary=True).items()}
    assert set(losses) == {"loss", "action_loss", "reward_loss", "pref_loss"}
    total = losses["action_loss"] + 0.7 * losses["reward_loss"] + 0.3 * losses["pref_loss"]
    assert float(losses["loss"]) == pytest.approx(float(total))
    assert float(losses["pref_loss"]) > 0
    with pytest.raises(ValueError, match="reward head"):
        compute_loss(m, out, b, ObjectiveSpec(reward_loss="mse"), binary=True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compute_loss_keys_every_model(name: str) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(name=name, hidden=8, decoder_hidden=8, attention={"heads": 2})
    m = build_model(spec, state_dim=2, n_channels=2, binary=False)
    b = step_batch([0.2, 0.4, 0.1], [0, 1, 0], [False, False, True], [True, True, True])
    losses = compute_loss(m, m(b), b, ObjectiveSpec(), binary=False)
    assert {"loss", "action_loss", "reward_loss", "pref_loss"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    extra = {
        "cql": {"q_loss", "td_loss", "cql_loss"},
        "iql": {"q_loss", "v_loss", "awr_loss"},
        "bcq": {"q_loss", "imitation_loss"},
    }
    assert extra.get(name, set()) <= set(losses)
