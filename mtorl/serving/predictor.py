"""``Predictor``: a checkpoint turned into per-step predictions. No Ray, no Serve.

An ensemble checkpoint (``mtorl ensemble``: meta.json's ``ensemble`` block) loads as an
``models.ensemble.Ensemble``, whose predictions are the mean of its members'; its outputs also carry the
members' spread of the reward (``reward_std``, read by the decision layer's ``ensemble_pessimism``), from
the same forward passes. A single model's ``reward_std`` is None: no extra work on its request path.

Offline evaluation and the Serve deployment both use it, so a request is preprocessed exactly as in
training: the checkpoint's own manifest (vocabulary, normalisation, reward scale) is the only source.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from mtorl.data.windows import Journey, pad_journeys
from mtorl.models import Batch, build_model
from mtorl.models.ensemble import Ensemble
from mtorl.spec import ModelSpec
from mtorl.data.manifest import Manifest
from mtorl.training.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint


@dataclass
class Prediction:
    action_probs: np.ndarray  # (T, C) π(c | history before t, s_t)
    reward: np.ndarray  # (T, C) predicted reward of every candidate channel at t
    reward_std: np.ndarray | None = None  # (T, C) an ensemble's members' population std of reward; None: one model


def extend_journey(j: Journey, next_state: np.ndarray) -> Journey:
    """The journey plus one pending step with state ``next_state``; its own labels are placeholders
    (the model is causal: outputs at the new step depend on a_{T−1}, r_{T−1} and s_T only)."""
    one = lambda a, v: np.concatenate([a, np.array([v], dtype=a.dtype)])  # noqa: E731
    return replace(j, channel=one(j.channel, 0), gain=one(j.gain, 0.0), cost=one(j.cost, 0.0),
                   propensity=one(j.propensity, np.nan), reward=one(j.reward, 0.0),
                   state=np.concatenate([j.state, np.asarray(next_state, dtype=np.float32)[None, :]]))


class Predictor:
    def __init__(self, loaded: LoadedCheckpoint, device: str = "cpu", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.loaded = loaded
        self.meta = loaded.meta
        self.manifest: Manifest = loaded.manifest
        self.channels: list[str] = list(self.manifest.channels)
        args = self.meta.model_args
        if args is None:
            raise CheckpointError(f"{loaded.uri}/meta.json: lacks model_args: not a trained model's checkpoint")
        self.binary = args.binary
        self.model_spec = ModelSpec.model_validate(self.meta.spec["spec"]["model"])
        self.device = torch.device(device)
        k = len(self.meta.ensemble.members) if self.meta.ensemble is not None else 0
        build = lambda: build_model(self.model_spec, state_dim=args.state_dim, n_channels=args.n_channels,  # noqa: E731
                                    binary=self.binary)
        model: torch.nn.Module = Ensemble([build() for _ in range(k)]) if k else build()
        try:
            model.load_state_dict(loaded.state_dict)
        except RuntimeError as e:
            what = f"an ensemble of {k}" if k else f"model {self.model_spec.name!r}"
            raise CheckpointError(f"{loaded.uri}/model.safetensors: weights do not fit {what} "
                                  f"({str(e).strip().splitlines()[0]})") from None
        self.model = model.to(self.device).eval()
        self.ensemble_size = max(k, 1)

    @classmethod
    def from_checkpoint(cls, uri: str, device: str = "cpu") -> "Predictor":
        return cls(load_checkpoint(uri), device=device)

    @property
    def name(self) -> str:
        return self.model_spec.name

    @property
    def uri(self) -> str:
        return self.loaded.uri

    @torch.no_grad()
    def predict_journeys(self, journeys: Sequence[Journey], batch_size: int = 256) -> list[Prediction]:
        """Predictions at every step of every journey; the prediction at t sees only inputs ≤ t."""
        out: list[Prediction] = []
        order = np.argsort([len(j.channel) for j in journeys], kind="stable")  # similar lengths batch together
        preds: dict[int, Prediction] = {}
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            chunk = [journeys[i] for i in idx]
            arrays = pad_journeys(chunk)
            batch = Batch.from_numpy(arrays, device=self.device)
            sd: np.ndarray | None = None
            if isinstance(self.model, Ensemble):
                p_t, r_t, sd_t = self.model.predict_spread(batch)           # (B, L, C) each
                sd = sd_t.float().cpu().numpy()
            else:
                p_t, r_t = self.model.predict(batch)
            probs, reward = p_t.float().cpu().numpy(), r_t.float().cpu().numpy()
            for k, i in enumerate(idx):
                T = len(journeys[i].channel)
                preds[int(i)] = Prediction(probs[k, :T], reward[k, :T], None if sd is None else sd[k, :T])
        for i in range(len(journeys)):
            out.append(preds[i])
        return out

    @torch.no_grad()
    def predict_last(self, state: np.ndarray, prev_channel: np.ndarray, prev_reward: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Outputs at the last step of equal-length histories with no padding.

        state (B, T, D) normalised, prev_channel (B, T) (−1 = none), prev_reward (B, T)
        -> action probs (B, C), reward (B, C).
        """
        B, T = prev_channel.shape
        batch = Batch.from_numpy({"state": state.astype(np.float32), "prev_channel": prev_channel.astype(np.int64),
                                  "prev_reward": prev_reward.astype(np.float32), "mask": np.ones((B, T), dtype=bool)},
                                 device=self.device)
        probs, reward = self.model.predict(batch)
        return probs[:, -1].float().cpu().numpy(), reward[:, -1].float().cpu().numpy()

    def predict_next(self, journeys: Sequence[Journey],
                     next_states: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Prediction for the step after each journey: inputs (a_{T−1}, r_{T−1}, s_T).

        ``next_states`` (B, D) are the normalised states of the coming opportunity; by default the
        last observed state is carried forward. Returns action probs (B, C), rewards (B, C) and the
        ensemble members' spread of the rewards (B, C) (None for a single model).
        """
        extended = [extend_journey(j, j.state[-1] if next_states is None else next_states[b]) for b, j in enumerate(journeys)]
        preds = self.predict_journeys(extended)
        sd = [p.reward_std[-1] for p in preds if p.reward_std is not None]
        return (np.stack([p.action_probs[-1] for p in preds]), np.stack([p.reward[-1] for p in preds]),
                np.stack(sd) if sd else None)
