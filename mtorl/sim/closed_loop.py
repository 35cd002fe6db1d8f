"""``mtorl evaluate --online``: a checkpoint's policy + budget allocation inside the simulator.

The checkpoint must have been trained on simulated logs: its dataset manifest names the simulation
(``input``), whose ``simulation.json`` rebuilds the exact simulator (same seed and parameters) with
its known response model. New users are drawn from it, so the comparison is on fresh users. The
budget is a fraction of what the logging policy spends on the same users with no budget.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mtorl import storage
from mtorl.evaluation.allocation import score_steps
from mtorl.spec import EvaluateSpec, SimulateSpec


def simulator_for(manifest: dict[str, Any]) -> Any:
    from mtorl.sim.generate import SIDECAR
    from mtorl.sim.model import Simulator

    src = manifest.get("input")
    uri = src.get("uri") if isinstance(src, dict) else src
    if not uri:
        raise ValueError("the checkpoint's manifest names no input: --online needs a model trained on simulated logs")
    side = storage.join(str(uri).rstrip("/"), SIDECAR)
    if not storage.exists(side):
        raise ValueError(f"{uri}: no {SIDECAR}; --online needs a model trained on logs written by `mtorl simulate`")
    meta = storage.read_json(side)
    return Simulator(SimulateSpec.model_validate(meta["spec"]))


def checkpoint_policy(predictor: Any, sim: Any) -> Any:
    """policy_fn for ``run_online``: full observable histories -> (channel (B,), value (B,))."""
    man = predictor.manifest
    names = list(man["step_features"]) + list(man["user_features"])
    from mtorl.sim.generate import user_feature_names
    from mtorl.sim.model import STEP_FEATURES

    sim_cols = list(STEP_FEATURES) + user_feature_names(sim.n_features)
    try:
        cols = [sim_cols.index(n) for n in names]
    except ValueError as e:
        raise ValueError(f"checkpoint features {names} do not match the simulator's {sim_cols}") from e
    to_model = np.array([predictor.channels.index(c) for c in sim.spec.channels])  # sim channel -> model index
    to_sim = np.argsort(to_model)
    mean = np.asarray(man["normalization"]["mean"], dtype=np.float32)
    std = np.asarray(man["normalization"]["std"], dtype=np.float32)
    costs_model = np.asarray(sim.costs, dtype=np.float64)[to_sim]
    penalty = float(man.get("penalty", 0.0))
    from mtorl.data.windows import compute_reward

    def fn(obs: Any) -> tuple[np.ndarray, np.ndarray]:
        h = obs.history()
        state = (h["state"][:, :, cols] - mean) / std
        pc = h["prev_channel"]
        prev = np.where(pc >= 0, to_model[np.clip(pc, 0, None)], -1)
        prev_cost = np.where(pc >= 0, np.asarray(sim.costs)[np.clip(pc, 0, None)], 0.0)
        prev_r = np.where(pc >= 0, compute_reward(h["prev_reward"], prev_cost, man), 0.0)
        probs, reward = predictor.predict_last(state, prev, prev_r)
        _, best, value, _ = score_steps(probs, reward, costs_model, penalty)
        return to_sim[best], np.asarray(value, dtype=np.float64)

    return fn


def run_online_evaluation(spec: EvaluateSpec, users: int = 2000, budget: float = 0.3, progress: Any = print) -> dict[str, Any]:
    from mtorl.serving.predictor import Predictor
    from mtorl.sim.online import logging_policy, oracle_policy, run_online

    t0 = time.time()
    predictor = Predictor.from_checkpoint(spec.checkpoint)
    sim = simulator_for(predictor.manifest)
    free = run_online(sim, logging_policy(sim, spec.seed), users, 1e18, seed=spec.seed, keep_history=False)
    W = budget * free["spend"]["value"]
    progress(f"closed loop: {users} fresh simulated users, budget {W:.1f} = {budget:.0%} of the logging policy's unconstrained spend")
    rows: dict[str, Any] = {}
    for name, fn, hist in (("logging", logging_policy(sim, spec.seed), False), ("oracle", oracle_policy(sim), False),
                           (predictor.name, checkpoint_policy(predictor, sim), True)):
        r = run_online(sim, fn, users, W, seed=spec.seed, keep_history=hist, n_boot=spec.bootstrap)
        rows[name] = r
        e = r["expected_reward"]
        progress(f"  {name:<8} true reward {e['value']:.1f} (95% CI {e['ci95'][0]:.1f}–{e['ci95'][1]:.1f})  "
                 f"spend {r['spend']['value']:.1f}  ROI {r['roi_expected']['value']:.4f}")
    out = {"kind": "EvaluateJob", "mode": "online", "checkpoint": predictor.uri, "users": users, "budget": W,
           "budget_fraction": budget, "results": _strip(rows), "wall_s": round(time.time() - t0, 2)}
    target = storage.join(spec.output, "online.json")
    storage.write_json(target, out)
    progress(f"online results: {target}")
    return out


def _strip(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in ("per_user_values", "history")}
    if isinstance(x, (list, tuple)):
        return [_strip(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist() if x.size <= 100 else None
    return x
