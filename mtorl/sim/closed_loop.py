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
from mtorl.data.manifest import Manifest
from mtorl.spec import DecisionSpec, EvaluateSpec, SimulateSpec


def simulation_uri(manifest: Manifest) -> str:
    """The ``mtorl simulate`` output a dataset was prepared from (ValueError when it was not)."""
    from mtorl.sim.generate import SIDECAR

    uri = manifest.input
    if not uri:
        raise ValueError("the checkpoint's manifest names no input: --online needs a model trained on simulated logs")
    if not storage.exists(storage.join(str(uri).rstrip("/"), SIDECAR)):
        raise ValueError(f"{uri}: no {SIDECAR}; --online needs a model trained on logs written by `mtorl simulate`")
    return str(uri).rstrip("/")


def simulator_for(manifest: Manifest) -> Any:
    from mtorl.sim.generate import SIDECAR
    from mtorl.sim.model import Simulator

    meta = storage.read_json(storage.join(simulation_uri(manifest), SIDECAR))
    return Simulator(SimulateSpec.model_validate(meta["spec"]))


def served_history(h: dict[str, np.ndarray], recency_col: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The served steps of closed-loop histories, plus the current step, in the logs' semantics.

    h: ``Observation.history()`` of B users at step t: state (B, t+1, D) raw, prev_channel (B, t+1)
    (-1 = the previous step was not served), prev_reward (B, t+1). The logs a checkpoint was trained
    on hold exposures only (every logged step was served), so an unserved opportunity is not a step
    of the journey: it is dropped, and its time goes into the recency (log1p of hours since the
    previous step, column ``recency_col``) of the next kept step. The first kept step has recency 0,
    as a journey's first step has in the logs.
    Returns right-padded state (B, L, D), prev_channel (B, L), prev_reward (B, L) and lengths (B,).
    """
    state, pc, pr = h["state"], h["prev_channel"], h["prev_reward"]
    B, T1, _ = state.shape
    keep = np.ones((B, T1), bool)
    keep[:, :-1] = pc[:, 1:] >= 0                                   # step t' < t was served
    n = keep.sum(axis=1)                                            # (B,) >= 1
    L = int(n.max())
    order = np.argsort(~keep, axis=1, kind="stable")[:, :L]        # kept positions first, in time order
    valid = np.arange(L)[None, :] < n[:, None]                      # (B, L)
    pos = np.where(valid, order, 0)
    gaps = np.expm1(np.clip(state[:, :, recency_col].astype(np.float64), 0, None))
    G = np.cumsum(gaps, axis=1)                                      # (B, t+1)
    Gp = np.take_along_axis(G, pos, axis=1)
    prev_pos = np.concatenate([np.zeros((B, 1), np.int64), pos[:, :-1]], axis=1)
    first = np.zeros((B, L), bool)
    first[:, 0] = True
    rec = np.where(first, 0.0, Gp - np.take_along_axis(G, prev_pos, axis=1))
    st = np.take_along_axis(state, pos[:, :, None], axis=1).copy()
    st[:, :, recency_col] = np.log1p(np.maximum(rec, 0.0))
    # the channel and outcome of the previous kept step are recorded at the step after it
    nxt = np.minimum(prev_pos + 1, T1 - 1)
    prev_c = np.where(first, -1, np.take_along_axis(pc, nxt, axis=1))
    prev_r = np.where(first, 0.0, np.take_along_axis(pr, nxt, axis=1))
    st[~valid] = 0.0
    return st, np.where(valid, prev_c, -1), np.where(valid, prev_r, 0.0), n


def checkpoint_policy(predictor: Any, sim: Any, decision: Any = None, history: str = "served") -> Any:
    """policy_fn for ``run_online``: full observable histories -> per-channel scores q (B, C) in sim order.

    q is the decision layer's pessimistic reward estimate (``decision.channel_values`` of the
    checkpoint's reward head and action decoder, ``decision`` = DecisionSpec / DecisionParams); the
    closed loop then solves the penalty s for each step's budget with the same ``solve_penalty`` as
    offline evaluation and ``/v1/allocate``. ``history``: "served" (default) feeds the model the
    served steps only, as its training logs hold them (``served_history``); "all" feeds every
    opportunity, an unserved one as a step with no previous channel.
    """
    import torch

    from mtorl.evaluation.decision import channel_values, params_of
    from mtorl.models import Batch
    from mtorl.models.ensemble import predict_spread

    man = predictor.manifest
    names = list(man.step_features) + list(man.user_features)
    from mtorl.sim.generate import user_feature_names
    from mtorl.sim.model import STEP_FEATURES

    sim_cols = list(STEP_FEATURES) + user_feature_names(sim.n_features)
    try:
        cols = [sim_cols.index(n) for n in names]
    except ValueError as e:
        raise ValueError(f"checkpoint features {names} do not match the simulator's {sim_cols}") from e
    if history not in ("served", "all"):
        raise ValueError(f"history must be 'served' or 'all', got {history!r}")
    to_model = np.array([predictor.channels.index(c) for c in sim.spec.channels])  # sim channel -> model index
    mean = np.asarray(man.normalization.mean, dtype=np.float32)
    std = np.asarray(man.normalization.std, dtype=np.float32)
    costs_model = np.asarray(sim.costs, dtype=np.float64)[np.argsort(to_model)]
    prm = params_of(decision)
    rec_col = sim_cols.index("recency")
    from mtorl.data.windows import compute_reward

    def fn(obs: Any) -> np.ndarray:
        h = obs.history()
        if history == "served":
            raw, pc, pr, n = served_history(h, rec_col)
        else:
            raw, pc, pr = h["state"], h["prev_channel"], h["prev_reward"]
            n = np.full(len(pc), pc.shape[1])
        state = (raw[:, :, cols] - mean) / std
        prev = np.where(pc >= 0, to_model[np.clip(pc, 0, None)], -1)
        prev_cost = np.where(pc >= 0, np.asarray(sim.costs)[np.clip(pc, 0, None)], 0.0)
        prev_r = np.where(pc >= 0, compute_reward(pr, prev_cost, man), 0.0)
        mask = np.arange(pc.shape[1])[None, :] < n[:, None]
        batch = Batch.from_numpy({"state": state.astype(np.float32), "prev_channel": prev.astype(np.int64),
                                  "prev_reward": prev_r.astype(np.float32), "mask": mask}, device=predictor.device)
        with torch.no_grad():  # (B, L, C) each; causal: padding after n is harmless
            p_all, r_all, sd_all = predict_spread(predictor.model, batch)
        last = torch.as_tensor(n - 1, device=p_all.device)[:, None, None].expand(-1, 1, p_all.shape[-1])
        probs = p_all.gather(1, last)[:, 0].float().cpu().numpy()
        reward = r_all.gather(1, last)[:, 0].float().cpu().numpy()
        sd = sd_all.gather(1, last)[:, 0].float().cpu().numpy()
        q = channel_values(reward, probs, prm, np.broadcast_to(costs_model, reward.shape), reward_std=sd)
        return np.asarray(q[:, to_model], dtype=np.float64)  # (B, C) in sim channel order

    return fn


def closed_loop_rows(predictor: Any, sim: Any, users: int, budget: float, seed: int, decision: Any,
                     n_boot: int = 200, extra: dict[str, Any] | None = None) -> tuple[float, dict[str, Any]]:
    """Every policy of the closed-loop table on the same ``users`` fresh users (seed ``seed``) and budget.

    The budget W = ``budget`` x the logging policy's unconstrained spend on those users. Rows: the
    logging policy, the full oracle (knows the hidden interest), the observable oracle (knows the
    response model, sees what a learner sees), the checkpoint through the decision layer (its
    ``decision.policy``), plus ``extra`` {name: DecisionSpec/DecisionParams} for the same checkpoint.
    Returns (W, {name: run_online result}).
    """
    from mtorl.evaluation.decision import params_of
    from mtorl.sim.online import logging_policy, observable_oracle_policy, oracle_policy, run_online

    free = run_online(sim, logging_policy(sim, seed), users, 1e18, seed=seed, keep_history=False)
    W = budget * free["spend"]["value"]
    # (name, policy, keeps history, channel_cost_weight of its decision layer)
    pols: list[tuple[str, Any, bool, float]] = [
        ("logging", logging_policy(sim, seed), False, 1.0), ("oracle", oracle_policy(sim), False, 1.0),
        ("observable oracle", observable_oracle_policy(sim, users, seed=seed), False, 1.0)]
    for name, d in {predictor.name: decision, **(extra or {})}.items():
        pols.append((name, checkpoint_policy(predictor, sim, d), True, params_of(d).channel_cost_weight))
    rows = {name: run_online(sim, fn, users, W, seed=seed, keep_history=hist, n_boot=n_boot, channel_cost_weight=g)
            for name, fn, hist, g in pols}
    return W, rows


def run_online_evaluation(spec: EvaluateSpec, users: int = 2000, budget: float = 0.3, progress: Any = print) -> dict[str, Any]:
    from mtorl.evaluation.run import decision_label
    from mtorl.serving.predictor import Predictor

    t0 = time.time()
    predictor = Predictor.from_checkpoint(spec.checkpoint)
    sim = simulator_for(predictor.manifest)
    decision = DecisionSpec.of_job(predictor.meta.spec, spec.decision)
    W, rows = closed_loop_rows(predictor, sim, users, budget, spec.seed, decision, n_boot=spec.bootstrap)
    progress(f"closed loop: {users} fresh simulated users, budget {W:.1f} = {budget:.0%} of the logging policy's unconstrained spend; "
             f"decision layer: {decision_label(decision)}")
    for name, r in rows.items():
        e = r["expected_reward"]
        pen = f"  mean s {r['penalty']['mean']:.4f}" if r.get("penalty") else ""
        progress(f"  {name:<18} true reward {e['value']:.1f} (95% CI {e['ci95'][0]:.1f}–{e['ci95'][1]:.1f})  "
                 f"spend {r['spend']['value']:.1f}  ROI {r['roi_expected']['value']:.4f}{pen}")
    ope = ope_vs_truth(predictor, sim, spec, decision=decision, progress=progress)
    out = {"kind": "EvaluateJob", "mode": "online", "checkpoint": predictor.uri, "users": users, "budget": W,
           "budget_fraction": budget, "decision": decision.model_dump(mode="json"), "results": _strip(rows),
           "ope_vs_truth": _strip(ope), "wall_s": round(time.time() - t0, 2)}
    storage.write_bytes(storage.join(spec.output, "online.md"), online_markdown(out).encode())
    target = storage.join(spec.output, "online.json")
    storage.write_json(target, out)  # written last: its presence means the run is complete
    progress(f"online results: {target} (table: {storage.join(spec.output, 'online.md')})")
    return out


def ope_vs_truth(predictor: Any, sim: Any, spec: EvaluateSpec, decision: Any = None, progress: Any = print) -> dict[str, Any]:
    """Each off-policy estimate of the checkpoint's policies on the logged split, against the truth.

    The logged users of ``spec.split`` (never seen in training) keep the simulator's response model
    per step (``true_p``). For a target policy pi the estimators (IPS, SNIPS, DM, DR) estimate the
    per-step value with contexts fixed to the logged ones; its true value is
    mean_t sum_c pi(c | s_t) p(s_t, c). PDIS estimates a per-journey return and is not compared.
    Returns {split, users, steps, unaligned_users, policies: {greedy|softmax: {truth, errors}}}.
    """
    from mtorl.evaluation.ope import behaviour_propensities, off_policy_estimates, target_policies
    from mtorl.evaluation.run import model_predictions, read_split
    from mtorl.sim.generate import read_journeys
    from mtorl.sim.online import ope_error, true_policy_value

    man = predictor.manifest
    data_uri = spec.data or predictor.meta.manifest_uri
    journeys = read_split(data_uri, spec.split)
    want = {j.user_id: j for j in journeys}
    sim_channels = list(sim.spec.channels)
    to_sim = np.array([sim_channels.index(c) for c in predictor.channels])  # model channel -> sim column
    truth: dict[str, np.ndarray] = {}
    unaligned = 0
    for d in read_journeys(simulation_uri(man)):
        j = want.get(d["user_id"])
        if j is None:
            continue
        if "true_p" not in d:
            raise ValueError(f"{simulation_uri(man)}: the simulation kept no ground truth (true_p); nothing to compare OPE with")
        # the prepared journey must be the logged one step for step (same channels in the same order)
        if len(d["channel"]) != j.length or not np.array_equal(to_sim[j.channel], d["channel"]):
            unaligned += 1
            continue
        truth[j.user_id] = np.asarray(d["true_p"], dtype=np.float64)[:, to_sim]
    kept = [j for j in journeys if j.user_id in truth]
    if not kept:
        raise ValueError(f"no {spec.split} journey of {data_uri} matches its simulated log step for step")
    p = model_predictions(predictor, kept, predictor.name)
    b, source = behaviour_propensities(p)
    tp = np.concatenate([truth[j.user_id] for j in kept])
    bounds = np.cumsum([0] + [j.length for j in kept])
    out: dict[str, Any] = {"split": spec.split, "users": len(kept), "steps": int(p.n_steps), "unaligned_users": unaligned,
                           "behaviour_source": source, "policies": {}}
    greedy, soft = target_policies(p, penalty=float(getattr(decision, "penalty", None) or 0.0),
                                   cost_per_channel=np.asarray(sim.costs)[to_sim], decision=decision)
    for name, pi in (("greedy", greedy), ("softmax", soft)):
        true = true_policy_value(sim, lambda jj: jj["pi"], ({"true_p": tp[a:z], "pi": pi[a:z]} for a, z in zip(bounds[:-1], bounds[1:])))
        est = off_policy_estimates(p, pi, b, n_boot=spec.bootstrap, seed=spec.seed)
        ests = {k: {"value": est[k]["value"], "ci95": [est[k]["ci_low"], est[k]["ci_high"]] if est[k]["ci_low"] is not None else None}
                for k in ("ips", "snips", "dm", "dr") if est[k]["value"] is not None}
        out["policies"][name] = {"truth": true, "errors": ope_error(ests, true["value"]), "ess": est["ess"], "warnings": est["warnings"]}
    logged_true = true_policy_value(sim, lambda jj: jj["pi"], ({"true_p": tp[a:z], "pi": np.eye(p.n_channels)[p.channel[a:z]]}
                                                                for a, z in zip(bounds[:-1], bounds[1:])))
    out["logged"] = {"observed": float((p.gain > 0).mean()), "true": logged_true["value"], "true_ci95": logged_true["ci95"]}
    progress(f"OPE vs the simulator's truth on {len(kept)} {spec.split} users ({p.n_steps} steps; behaviour: {source}):")
    for name, r in out["policies"].items():
        errs = "  ".join(f"{k} {e['estimate']:.4f} (err {e['abs_error']:.4f}{'' if 'covered' not in e else ', CI covers' if e['covered'] else ', CI misses'})"
                         for k, e in r["errors"].items())
        progress(f"  {name:<8} true {r['truth']['value']:.4f} (95% CI {r['truth']['ci95'][0]:.4f}–{r['truth']['ci95'][1]:.4f}, "
                 f"logged {out['logged']['true']:.4f})  {errs}")
    return out


def online_markdown(out: dict[str, Any]) -> str:
    """The closed-loop table and the OPE-vs-truth table of an ``evaluate --online`` result."""
    md = [f"# Closed-loop evaluation of {out['checkpoint']}", "",
          f"{out['users']} fresh simulated users; budget {out['budget']:.1f} = {out['budget_fraction']:.0%} of the logging "
          "policy's unconstrained spend. True reward = sum of the response model's probabilities of the served steps.", "",
          "| policy | true reward | 95% CI | spend | ROI | mean s | logger→oracle gap closed |", "|---|---|---|---|---|---|---|"]
    res = out["results"]
    lo_v, hi_v = res["logging"]["expected_reward"]["value"], res["oracle"]["expected_reward"]["value"]
    for name, r in res.items():
        e = r["expected_reward"]
        gap = f"{(e['value'] - lo_v) / (hi_v - lo_v):.0%}" if hi_v > lo_v else "–"
        pen = f"{r['penalty']['mean']:.4f}" if r.get("penalty") else "–"
        md.append(f"| {name} | {e['value']:.1f} | {e['ci95'][0]:.1f}–{e['ci95'][1]:.1f} | {r['spend']['value']:.1f} | "
                  f"{r['roi_expected']['value']:.4f} | {pen} | {gap} |")
    if out.get("decision"):
        d = out["decision"]
        md += ["", f"Decision layer of the checkpoint: policy {d['policy']}, support threshold {d['support_threshold']:g}, "
               f"pessimism {d['pessimism']:g}"
               + (f", ensemble pessimism beta_e {d['ensemble_pessimism']:g}" if d.get("ensemble_pessimism") else "")
               + "; s is solved at every step for that step's share of the budget (the same "
               "function as offline evaluation and /v1/allocate). The oracles go through the same allocator with the true "
               "(oracle) or posterior-mean (observable oracle) reward probabilities; the logging policy serves random users."]
    ope = out.get("ope_vs_truth")
    if ope:
        md += ["", f"## Off-policy estimates vs the simulator's truth ({ope['split']} split)", "",
               f"{ope['users']} logged users never seen in training, {ope['steps']} steps; behaviour propensities: "
               f"{ope['behaviour_source']}. Per-step value with contexts fixed to the logged ones; the logging "
               f"policy's observed rate is {ope['logged']['observed']:.4f} (true {ope['logged']['true']:.4f}).", "",
               "| target policy | true value | estimator | estimate | abs. error | rel. error | 95% CI covers truth |",
               "|---|---|---|---|---|---|---|"]
        for pol, r in ope["policies"].items():
            for k, e in r["errors"].items():
                cov = "–" if "covered" not in e else ("yes" if e["covered"] else "no")
                md.append(f"| {pol} | {r['truth']['value']:.4f} | {k.upper()} | {e['estimate']:.4f} | {e['abs_error']:.4f} | "
                          f"{e['rel_error']:.1%} | {cov} |")
    return "\n".join(md) + "\n"


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
