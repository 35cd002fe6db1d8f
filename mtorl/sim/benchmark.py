"""The closed-loop benchmark table: budgets x seeds, every policy on the same fresh users.

    python -m mtorl.sim.benchmark --checkpoint s3://mtorl/runs/sim-mtorl --out docs/results/sim-closed-loop \\
        --budgets 0.1 0.3 0.5 --seeds 1 2 3 --users 2000

(needs the object store of the checkpoint and its simulation; see scripts/online.sh). For every budget
fraction f and seed, `closed_loop.closed_loop_rows` plays the logging policy, the full oracle, the
observable oracle and the checkpoint (through its decision layer, plus the imitation policy of the
same checkpoint) on the same fresh users, with budget f x the logging policy's unconstrained spend.
The table gives the mean over seeds of the true reward with a 95% CI (normal, from the per-seed
per-user variances: the seeds are independent draws of users), and the share of the logger -> oracle
gap each policy closes. The OPE-vs-truth section gives the channel policy's true per-step value on
the logged test users against the logging policy's. Written: OUT.md and OUT.json (JSON last).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _mean_ci(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over seeds of a total with its 95% CI, from each seed's normal CI half-width."""
    v = np.array([r["value"] for r in rows])
    half = np.array([(r["ci95"][1] - r["ci95"][0]) / 2 for r in rows])
    h = float(np.sqrt((half**2).sum()) / len(rows))
    m = float(v.mean())
    return {"value": m, "ci95": [m - h, m + h], "per_seed": v.tolist()}


def run_benchmark(
    checkpoint: str,
    budgets: Sequence[float],
    seeds: Sequence[int],
    users: int,
    decision: Any = None,
    ope_split: str = "test",
    imitation_at: Sequence[float] = (0.3,),
    ensemble_pessimism: Sequence[float] = (),
    channel_cost_weight: Sequence[float] = (),
    progress: Any = print,
) -> dict[str, Any]:
    from mtorl.evaluation.decision import DecisionParams, params_of
    from mtorl.evaluation.run import decision_label
    from mtorl.spec import DecisionSpec
    from mtorl.serving.predictor import Predictor
    from mtorl.sim.closed_loop import closed_loop_rows, ope_vs_truth, simulator_for
    from mtorl.spec import make_job

    t0 = time.time()
    predictor = Predictor.from_checkpoint(checkpoint)
    sim = simulator_for(predictor.manifest)
    dec = DecisionSpec.of_job(predictor.meta.spec, decision)
    extra = (
        {}
        if dec.policy == "imitation"
        else {f"{predictor.name} (imitation policy)": DecisionParams(policy="imitation")}
    )
    # the same decision layer scoring r-hat - beta_e * (the members' spread): a row at every budget (the
    # checkpoint's row uses the spec's decision.ensemble_pessimism)
    base = params_of(dec)
    own_g = "" if base.channel_cost_weight == 1.0 else f", channel cost weight g = {base.channel_cost_weight:g}"
    spread = {f"{predictor.name}, ensemble pessimism β_e = {b:g}{own_g}": base._replace(ensemble_pessimism=float(b))
              for b in ensemble_pessimism}
    # ... and choosing the channel with the cost weighted by g (decision.channel_cost_weight), with each
    # β_e above (or the spec's own when none is given)
    spread.update({f"{predictor.name}, {'' if b is None else f'β_e = {b:g}, '}channel cost weight g = {g:g}":
                   base._replace(ensemble_pessimism=float(base.ensemble_pessimism if b is None else b),
                                 channel_cost_weight=float(g))
                   for g in channel_cost_weight for b in (list(ensemble_pessimism) or [None])})
    table: dict[str, Any] = {}
    for f in budgets:
        per: dict[str, list[dict[str, Any]]] = {}
        pens: dict[str, list[float]] = {}
        for seed in seeds:
            more = {**(extra if any(abs(f - g) < 1e-9 for g in imitation_at) else {}), **spread}
            W, rows = closed_loop_rows(predictor, sim, users, f, seed, dec, n_boot=50, extra=more)
            for name, r in rows.items():
                per.setdefault(name, []).append(r["expected_reward"])
                if r.get("penalty"):
                    pens.setdefault(name, []).append(r["penalty"]["mean"])
            progress(
                f"budget {f:.0%} seed {seed}: "
                + "  ".join(f"{n} {r['expected_reward']['value']:.1f}" for n, r in rows.items())
            )
        agg = {n: _mean_ci(v) for n, v in per.items()}
        lo, hi = agg["logging"]["value"], agg["oracle"]["value"]
        for n, a in agg.items():
            a["gap_closed"] = (a["value"] - lo) / (hi - lo) if hi > lo else None
            a["mean_penalty"] = float(np.mean(pens[n])) if n in pens else None
        table[f"{f:g}"] = agg
    spec = make_job(
        "EvaluateJob",
        "bench-online",
        {"checkpoint": checkpoint, "output": "unused", "split": ope_split, "bootstrap": 100},
    ).spec
    ope = ope_vs_truth(predictor, sim, spec, decision=dec, progress=progress)
    return {
        "checkpoint": predictor.uri,
        "members": ensemble_members(predictor.meta),
        "decision_overrides": dict(predictor.meta.ensemble.decision_overrides) if predictor.meta.ensemble else {},
        "users": users,
        "seeds": list(seeds),
        "budgets": list(budgets),
        "decision": dec.model_dump(mode="json"),
        "decision_label": decision_label(dec),
        "table": table,
        "ope": {
            "split": ope["split"],
            "users": ope["users"],
            "steps": ope["steps"],
            "logged": ope["logged"],
            "greedy_truth": ope["policies"]["greedy"]["truth"],
            "softmax_truth": ope["policies"]["softmax"]["truth"],
        },
        "wall_s": round(time.time() - t0, 1),
    }


def ensemble_members(meta: Any) -> list[dict[str, Any]] | None:
    """[{checkpoint, seed}] of an ensemble checkpoint's members; None for a single model."""
    if getattr(meta, "ensemble", None) is None:
        return None
    return [{"checkpoint": m.checkpoint, "seed": m.seed} for m in meta.ensemble.members]


def markdown(res: dict[str, Any], command: str) -> str:
    md = [
        "# Closed loop in the simulator: budgets x seeds",
        "",
        f"Command: `{command}`",
        "",
        f"Checkpoint {res['checkpoint']}{_members_note(res.get('members'))}; {res['users']} fresh simulated users per seed, "
        f"seeds {res['seeds']} (the same users "
        "for every policy of a seed). Budget = fraction of the logging policy's unconstrained spend on those users. "
        "True reward = sum of the response model's probabilities of the served steps; mean over seeds with a 95% CI. "
        f"Decision layer: {res['decision_label']}{overrides_note(res.get('decision_overrides'))}; s solved per step "
        "for that step's share of the budget.",
        "",
        "Rows: `logging` = the logging policy (random users within the budget); `oracle` = knows the hidden interest z "
        "(the ceiling); `observable oracle` = knows the response model but sees only what a learner sees (particle "
        "posterior of z given features and outcomes): the ceiling of what is learnable; the gap between the two oracles "
        "is hidden from every learner.",
        "",
    ]
    names = list(dict.fromkeys(n for agg in res["table"].values() for n in agg))
    md += ["| budget | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for f, agg in res["table"].items():
        cells = []
        for n in names:
            a = agg.get(n)
            if a is None:
                cells.append("–")
                continue
            g = (
                f"; {a['gap_closed']:.0%} of gap"
                if a.get("gap_closed") is not None and n not in ("logging", "oracle")
                else ""
            )
            cells.append(f"{a['value']:.1f} [{a['ci95'][0]:.1f}, {a['ci95'][1]:.1f}]{g}")
        md.append(f"| {float(f):.0%} | " + " | ".join(cells) + " |")
    md += [
        "",
        "Mean penalty s over steps (score policies): "
        + "; ".join(
            f"{float(f):.0%}: "
            + ", ".join(f"{n} {a['mean_penalty']:.4f}" for n, a in agg.items() if a.get("mean_penalty") is not None)
            for f, agg in res["table"].items()
        )
        + ".",
        "",
    ]
    o = res["ope"]
    g, lg = o["greedy_truth"], o["logged"]
    md += [
        "## Channel policy on the logged test users (true value)",
        "",
        f"{o['users']} logged {o['split']} users never seen in training, {o['steps']} steps. True per-step value "
        "(the response model's probability, contexts fixed to the logged ones), 95% CI over journeys:",
        "",
        "| policy | true per-step value | 95% CI |",
        "|---|---|---|",
        f"| logged channels | {lg['true']:.4f} | {lg['true_ci95'][0]:.4f}–{lg['true_ci95'][1]:.4f} |",
        f"| decision layer (epsilon-greedy, eps 0.05, s = 0) | {g['value']:.4f} | {g['ci95'][0]:.4f}–{g['ci95'][1]:.4f} |",
        f"| action decoder (softmax) | {o['softmax_truth']['value']:.4f} | {o['softmax_truth']['ci95'][0]:.4f}–"
        f"{o['softmax_truth']['ci95'][1]:.4f} |",
        "",
        f"Wall time {res['wall_s']:.0f} s (shared machine).",
        "",
    ]
    return "\n".join(md)


def overrides_note(overrides: dict[str, Any] | None) -> str:
    """`` (set by `mtorl ensemble --decision`: ensemble_pessimism = 1, ...)`` for the decision line; "" for none."""
    if not overrides:
        return ""
    return " (set on the ensemble by `mtorl ensemble --decision`: " + ", ".join(
        f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in overrides.items()) + ")"


def _members_note(members: list[dict[str, Any]] | None) -> str:
    if not members:
        return ""
    return (f" (an ensemble of {len(members)}: the mean of the predictions of "
            + ", ".join(f"{m['checkpoint']} (training seed {m['seed']})" for m in members) + ")")


def write_benchmark(checkpoint: str, out: str, budgets: Sequence[float], seeds: Sequence[int], users: int,
                    imitation_at: Sequence[float], command: str,
                    ensemble_pessimism: Sequence[float] = (),
                    channel_cost_weight: Sequence[float] = ()) -> tuple[Path, Path]:
    """Run :func:`run_benchmark` and write ``OUT.md`` and ``OUT.json`` (``command`` heads the markdown)."""
    res = run_benchmark(checkpoint, list(budgets), list(seeds), users, imitation_at=list(imitation_at),
                        ensemble_pessimism=list(ensemble_pessimism), channel_cost_weight=list(channel_cost_weight))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(markdown(res, command))
    path.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float))
    return path.with_suffix(".md"), path.with_suffix(".json")


if __name__ == "__main__":
    from mtorl.cli import sim_benchmark_main

    raise SystemExit(sim_benchmark_main())
