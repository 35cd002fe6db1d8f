"""Evaluation bundle of one model and the report files of a comparison (numpy + matplotlib Agg).

`evaluate_predictions` runs metrics, the budget curve and OPE for one `Predictions`;
`write_report` writes, into a LOCAL directory, metrics.json (primary model + a `compare` section),
report.md (comparison tables, heuristics first) and PNG plots. The caller uploads the directory.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

from mtorl.evaluation.allocation import budget_curve
from mtorl.evaluation.heuristics import HEURISTICS
from mtorl.evaluation.metrics import channel_metrics, reward_metrics
from mtorl.evaluation.ope import ESTIMATORS, evaluate_policies
from mtorl.evaluation.predictions import Predictions

__all__ = ["evaluate_predictions", "write_report", "plot_training_curves", "to_jsonable"]

BUDGET_KEYS = ("fraction", "budget", "spend", "selected", "select_rate", "replay_rate", "roi", "penalty")


def evaluate_predictions(p: Predictions, fractions: Sequence[float], n_boot: int = 200, seed: int = 0,
                         behaviour_probs: np.ndarray | None = None, penalty: float = 0.0,
                         cost_per_channel: np.ndarray | None = None, gamma: float = 1.0,
                         kind: str | None = None, decision: Any = None) -> dict[str, Any]:
    """Channel + reward metrics, budget curve and OPE of one model (or heuristic), all through the
    decision layer `decision` (DecisionParams / DecisionSpec; None = defaults). The OPE channel
    policy uses the fixed penalty `penalty` (or decision.penalty when that is set).

    Returns {name, kind ("heuristic" | "model"), n_users, n_steps, channels, binary, channel{...},
    reward{...}, base_rate, budget: [{fraction, budget, spend, selected, select_rate, replay_rate,
    roi, multiplier}], ope{...}}.
    """
    s_fixed = float(getattr(decision, "penalty", None) or penalty)
    curve = budget_curve(p, fractions, cost_per_channel=cost_per_channel, seed=seed, decision=decision)
    return {
        "name": p.name,
        "kind": kind or ("heuristic" if p.name in HEURISTICS else "model"),
        "n_users": p.n_users,
        "n_steps": p.n_steps,
        "channels": list(p.channels),
        "binary": bool(p.binary),
        "channel": channel_metrics(p),
        "reward": reward_metrics(p),
        "base_rate": curve["base_rate"],
        "budget": curve["points"],
        "ope": evaluate_policies(p, behaviour_probs, n_boot=n_boot, seed=seed, gamma=gamma,
                                 penalty=s_fixed, cost_per_channel=cost_per_channel, decision=decision),
    }


# ----------------------------------------------------------------------------- json

def to_jsonable(x: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN/inf -> None (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    return x


def _at(budget: list[dict], fraction: float, key: str) -> float | None:
    for pt in budget:
        if abs(pt["fraction"] - fraction) < 1e-9:
            return pt[key]
    return None


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    ope = r.get("ope") or {}
    return {
        "kind": r.get("kind"),
        "n_users": r.get("n_users"), "n_steps": r.get("n_steps"),
        "channel": {k: r["channel"].get(k) for k in ("accuracy", "macro_f1", "macro_precision",
                                                      "macro_recall", "auc_per_channel", "mean_auc")},
        "reward": {k: r["reward"].get(k) for k in ("auc", "logloss", "ece", "mse", "mae", "spearman")
                   if k in r["reward"]},
        "base_rate": r.get("base_rate"),
        "budget": [{k: pt.get(k) for k in BUDGET_KEYS} for pt in r.get("budget", [])],
        "ope": {k: ope.get(k) for k in ESTIMATORS if k in ope},
    }


def _ordered(results: dict[str, dict]) -> list[str]:
    heur = [n for n, r in results.items() if r.get("kind") == "heuristic"]
    return heur + [n for n in results if n not in heur]


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{nd}f}"


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finish(fig: Any, ax: Any, path: str, title: str, xlabel: str | None, ylabel: str, grid: bool = True) -> None:
    """Labels, legend (and grid) on ``ax``; ``fig`` saved to ``path`` and closed."""
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    if grid:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _plot_budget(results: dict[str, dict], names: list[str], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    base = None
    for n in names:
        pts = [pt for pt in results[n]["budget"] if pt.get("select_rate") is not None]
        if pts:
            ls = "--" if results[n].get("kind") == "heuristic" else "-"
            ax.plot([pt["fraction"] for pt in pts], [pt["select_rate"] for pt in pts], ls, marker="o", ms=3, label=n)
        base = base if base is not None else results[n].get("base_rate")
    if base is not None:
        ax.axhline(base, color="grey", lw=1, ls=":", label="base rate")
    _finish(fig, ax, path, "Budget curve", "budget (fraction of logged cost)", "reward rate of selected steps")


def _plot_auc(results: dict[str, dict], names: list[str], path: str) -> None:
    plt = _plt()
    channels = list(results[names[0]]["channel"]["auc_per_channel"].keys())
    fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * len(channels) * max(1, len(names))), 4.2))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(channels))
    for i, n in enumerate(names):
        auc = results[n]["channel"]["auc_per_channel"]
        ax.bar(x + i * width, [auc.get(c) if auc.get(c) is not None else 0.0 for c in channels], width, label=n)
    ax.axhline(0.5, color="grey", lw=1, ls=":")
    ax.set_xticks(x + 0.4 - width / 2, channels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    _finish(fig, ax, path, "Per-channel AUC", None, "one-vs-rest AUC", grid=False)


def _plot_reliability(results: dict[str, dict], names: list[str], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":")
    for n in names:
        rel = results[n]["reward"].get("reliability")
        if not rel:
            continue
        xs = [m for m, f in zip(rel["mean_pred"], rel["frac_pos"]) if m is not None and f is not None]
        ys = [f for m, f in zip(rel["mean_pred"], rel["frac_pos"]) if m is not None and f is not None]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{n} (ECE {_fmt(results[n]['reward'].get('ece'))})")
    _finish(fig, ax, path, "Reliability (logged channel)", "mean predicted reward", "observed rate")


def plot_training_curves(history: list[dict[str, Any]], path: str) -> str | None:
    """One subplot per metric suffix (train/x and val/x together) vs epoch (or row index).

    history: [{"epoch": e, "train/loss": ..., "val/loss": ..., ...}]. Returns the path, or None
    when there is nothing numeric to plot.
    """
    if not history:
        return None
    xkey = "epoch" if all("epoch" in h for h in history) else ("step" if all("step" in h for h in history) else None)
    xs = [h[xkey] for h in history] if xkey else list(range(len(history)))
    keys: list[str] = []
    for h in history:
        for k, v in h.items():
            if k not in (xkey, "epoch", "step") and k not in keys and isinstance(v, (int, float, np.number)) \
                    and not isinstance(v, bool):
                keys.append(k)
    if not keys:
        return None
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.split("/", 1)[-1], []).append(k)
    plt = _plt()
    n = len(groups)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (suffix, ks) in zip(axes.flat, groups.items()):
        for k in ks:
            pts = [(x, h[k]) for x, h in zip(xs, history) if isinstance(h.get(k), (int, float, np.number))]
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", ms=3, label=k)
        ax.set_title(suffix, fontsize=9)
        ax.set_xlabel(xkey or "row")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report

def _markdown(results: dict[str, dict], names: list[str], primary: str, notes: Sequence[str]) -> str:
    r0 = results[primary]
    lines = [f"# Evaluation report: {primary}", "",
             f"{r0['n_users']} users, {r0['n_steps']} steps, {len(r0.get('channels', []))} channels; "
             f"logged reward rate {_fmt(r0.get('base_rate'))}.", "",
             "The split is by user: no user of this split was seen in training. Heuristic rows "
             "(`history`, `majority`) use only each user's earlier steps and train-split priors.", ""]
    lines += ["## Comparison", "",
              "| model | channel acc | macro-F1 | mean AUC | reward AUC | logloss | ECE | select@0.2 | "
              "select@0.5 | OPE DR (greedy) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = results[n]
        dr = (r.get("ope") or {}).get("dr") or {}
        ci = f" [{_fmt(dr.get('ci_low'))}, {_fmt(dr.get('ci_high'))}]" if dr.get("ci_low") is not None else ""
        label = f"**{n}**" if n == primary else n
        lines.append(f"| {label} | {_fmt(r['channel']['accuracy'])} | {_fmt(r['channel']['macro_f1'])} | "
                     f"{_fmt(r['channel']['mean_auc'])} | {_fmt(r['reward'].get('auc'))} | "
                     f"{_fmt(r['reward'].get('logloss'))} | {_fmt(r['reward'].get('ece'))} | "
                     f"{_fmt(_at(r['budget'], 0.2, 'select_rate'))} | {_fmt(_at(r['budget'], 0.5, 'select_rate'))} | "
                     f"{_fmt(dr.get('value'))}{ci} |")
    lines += ["", "## Budget curve", "",
              "Reward rate of the user-steps chosen within a budget that is a fraction of the logged cost "
              "(select = logged rate of the chosen steps; replay = rewards where the recommended channel "
              "is the logged one, over the number chosen).", "",
              "| fraction | " + " | ".join(f"{n} select / replay" for n in names) + " |",
              "|---|" + "---|" * len(names)]
    fracs = [pt["fraction"] for pt in r0["budget"]]
    for f in fracs:
        cells = [f"{_fmt(_at(results[n]['budget'], f, 'select_rate'))} / {_fmt(_at(results[n]['budget'], f, 'replay_rate'))}"
                 for n in names]
        lines.append(f"| {f:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Base rate (all steps): {_fmt(r0.get('base_rate'))}.", "", "## Off-policy evaluation", "",
              f"Behaviour propensities: {(r0.get('ope') or {}).get('behaviour_source', '–')}. Greedy policy = "
              f"epsilon-greedy on the recommended channel; IPS/SNIPS/DM/DR are per-step values, PDIS a "
              f"per-journey return; 95% bootstrap intervals over users.", "",
              "| model | policy | IPS | SNIPS | DM | DR | PDIS | ESS |", "|---|---|---|---|---|---|---|---|"]
    for n in names:
        ope = results[n].get("ope") or {}
        for pol in ("greedy", "softmax"):
            o = ope.get(pol)
            if not o:
                continue
            cells = [f"{_fmt(o[k]['value'])}" for k in ESTIMATORS]
            lines.append(f"| {n} | {pol} | " + " | ".join(cells) + f" | {_fmt(o.get('ess'), 1)} |")
    warn = [(n, w) for n in names for w in ((results[n].get("ope") or {}).get("warnings") or [])]
    if warn:
        lines += ["", "OPE warnings (greedy policy):", ""] + [f"- {n}: {w}" for n, w in warn]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    lines += ["", "## Plots", "", "![budget curve](budget_curve.png)", "", "![per-channel AUC](channel_auc.png)",
              "", "![reliability](reliability.png)", ""]
    return "\n".join(lines)


def write_report(out_dir: str, results: dict[str, dict[str, Any]], primary: str,
                 notes: Sequence[str] | None = None,
                 history: list[dict[str, Any]] | None = None) -> list[str]:
    """Write metrics.json, report.md and the plots into the local directory `out_dir`.

    results: {name: evaluate_predictions(...)} (heuristics are put first, by `kind`); primary: the
    name whose metrics are at the top level of metrics.json. history: training-curve rows
    (optional, adds training_curves.png). Returns the written paths.
    """
    if primary not in results:
        raise ValueError(f"primary {primary!r} not in results {list(results)}")
    notes = list(notes or [])
    os.makedirs(out_dir, exist_ok=True)
    names = _ordered(results)
    paths: list[str] = []

    metrics = {"primary": primary, **_summary(results[primary]),
               "reward_full": results[primary]["reward"],
               "ope_full": results[primary].get("ope"),
               "budget_full": results[primary].get("budget"),
               "compare": {n: _summary(results[n]) for n in names},
               "notes": notes}
    p = os.path.join(out_dir, "metrics.json")
    with open(p, "w") as f:
        json.dump(to_jsonable(metrics), f, indent=2, allow_nan=False)
    paths.append(p)

    p = os.path.join(out_dir, "report.md")
    with open(p, "w") as f:
        f.write(_markdown(results, names, primary, notes))
    paths.append(p)

    for fname, fn in (("budget_curve.png", _plot_budget), ("channel_auc.png", _plot_auc),
                      ("reliability.png", _plot_reliability)):
        p = os.path.join(out_dir, fname)
        fn(results, names, p)
        paths.append(p)
    if history:
        p = plot_training_curves(history, os.path.join(out_dir, "training_curves.png"))
        if p:
            paths.append(p)
    return paths
