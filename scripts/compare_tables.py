"""Tables of a comparison run (called by scripts/compare.sh): which inputs every row had, and its results.

    python scripts/compare_tables.py --dataset kuairand --split test --report s3://mtorl/reports/kuairand-compare-test \
        --row mtorl=s3://mtorl/runs/kuairand-mtorl --row bc_mlp=s3://mtorl/runs/kuairand-bc-mlp ... \
        --ablation mtorl-no-stats=s3://mtorl/runs/kuairand-mtorl-no-stats ... --out docs/results/kuairand-compare

Reads the evaluation's metrics.json (one evaluation scored every row and the heuristics, through the same
decision layer) and each row's checkpoint (its training spec: model, history statistics, attention,
objective weights, trainer budget). Writes OUT.md and OUT.json; with ablations also OUT's ablation table
(<dataset>-ablation[-val].md). Every figure is read from those files; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mtorl import storage
from mtorl.training.checkpoint import list_run_checkpoints, load_checkpoint

BUDGETS = (0.2, 0.5)


def _pair(s: str) -> tuple[str, str]:
    label, _, uri = s.partition("=")
    if not label or not uri:
        raise argparse.ArgumentTypeError(f"expected LABEL=RUN_URI, got {s!r}")
    return label, uri


def epochs_trained(run_uri: str, spec_epochs: Any) -> Any:
    """Epochs the run actually trained (its latest checkpoint's epoch + 1; a resumed run may have been
    started with another ``trainer.epochs``), else the spec's."""
    cks = list_run_checkpoints(run_uri)
    return int(cks[-1][1]["epoch"]) + 1 if cks else spec_epochs


def inputs_of(run_uri: str) -> dict[str, Any]:
    """The training spec fields that say what a row saw and how it was trained."""
    ck = load_checkpoint(run_uri)
    spec = (ck.meta.get("spec") or {}).get("spec") or {}
    model, obj, tr = spec.get("model") or {}, spec.get("objective") or {}, spec.get("trainer") or {}
    return {
        "run": run_uri, "checkpoint": ck.uri, "model": model.get("name"),
        "history_stats": bool(model.get("history_stats", True)),
        "attention_layers": (model.get("attention") or {}).get("layers"),
        "hidden": model.get("hidden"), "reward_weight": obj.get("reward_weight"), "pref_weight": obj.get("pref_weight"),
        "epochs": epochs_trained(run_uri, tr.get("epochs")), "lr": tr.get("lr"), "batch_size": tr.get("batch_size"),
        "selection_metric": tr.get("metric"), "best_epoch": ck.meta.get("epoch"),
        "window": (spec.get("window") or {}).get("length"),
        "val": {k: (ck.meta.get("metrics") or {}).get(f"val/{k}") for k in ("reward_auc", "select_rate@budget")},
    }


def key_of(label: str, info: dict[str, Any], compare: dict[str, Any]) -> str:
    """The row's name in metrics.json: the model name, or name@run when several rows share a model."""
    run = Path(info["run"].rstrip("/")).name
    for k in (f"{info['model']}@{run}", info["model"], label):
        if k in compare:
            return k
    raise KeyError(f"row {label} ({info['run']}) is not in the evaluation's metrics.json (rows: {sorted(compare)})")


def results_of(r: dict[str, Any]) -> dict[str, Any]:
    budget = {round(float(p["fraction"]), 3): p for p in r.get("budget") or []}
    dr = (r.get("ope") or {}).get("dr") or {}
    out = {"reward_auc": r["reward"].get("auc"), "logloss": r["reward"].get("logloss"), "ece": r["reward"].get("ece"),
           "channel_accuracy": r["channel"].get("accuracy"), "logged_value": r.get("base_rate"),
           "ope_dr": {k: dr.get(k) for k in ("value", "ci_low", "ci_high")}}
    for b in BUDGETS:
        p = budget.get(b) or {}
        out[f"select@{b:g}"] = p.get("select_rate")
        out[f"penalty@{b:g}"] = p.get("penalty")
    lo, base = out["ope_dr"]["ci_low"], out["logged_value"]
    out["dr_lower_above_logged"] = None if lo is None or base is None else bool(lo > base)
    return out


def _f(v: Any, nd: int = 3) -> str:
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _dr(m: dict[str, Any]) -> str:
    d = m["ope_dr"]
    return f"{_f(d['value'])} [{_f(d['ci_low'])}, {_f(d['ci_high'])}]"


def _best(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r["metrics"][key] for r in rows if r["metrics"].get(key) is not None]
    return max(vals) if vals else None


def _cell(v: Any, best: float | None) -> str:
    s = _f(v)
    return f"**{s}**" if v is not None and best is not None and abs(v - best) < 5e-4 else s


def main_table(rows: list[dict[str, Any]]) -> list[str]:
    keys = ("reward_auc", "select@0.2", "select@0.5")
    best = {k: _best(rows, k) for k in keys}
    best_dr = max((r["metrics"]["ope_dr"]["value"] for r in rows if r["metrics"]["ope_dr"]["value"] is not None), default=None)
    out = ["| row | model | history stats | lr | val reward AUC | val select@budget | reward AUC | logloss | select@0.2 | select@0.5 | OPE DR of the decision policy [95% CI] | DR lower bound > logged |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, i = r["metrics"], r["inputs"]
        hs = "–" if i is None else ("on" if i["history_stats"] else "off")
        lr = "–" if i is None else _f(i["lr"], 4)
        val = "– | –" if i is None else f"{_f(i['val']['reward_auc'])} | {_f(i['val']['select_rate@budget'])}"
        dr = _dr(m)
        if best_dr is not None and m["ope_dr"]["value"] is not None and abs(m["ope_dr"]["value"] - best_dr) < 5e-4:
            dr = f"**{dr}**"
        lo = m["dr_lower_above_logged"]
        out.append(f"| {r['label']} | {r['model']} | {hs} | {lr} | {val} | " + " | ".join(_cell(m[k], best[k]) for k in keys[:1])
                   + f" | {_f(m['logloss'])} | " + " | ".join(_cell(m[k], best[k]) for k in keys[1:])
                   + f" | {dr} | {'–' if lo is None else ('yes' if lo else 'no')} |")
    return out


def ablation_table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| row | history stats | attention layers | λ (pref_weight) | μ (reward_weight) | val reward AUC | reward AUC | select@0.2 | select@0.5 | OPE DR [95% CI] |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, i = r["metrics"], r["inputs"]
        out.append(f"| {r['label']} | {'on' if i['history_stats'] else 'off'} | {i['attention_layers']} | {_f(i['pref_weight'], 2)} | "
                   f"{_f(i['reward_weight'], 2)} | {_f(i['val']['reward_auc'])} | {_f(m['reward_auc'])} | {_f(m['select@0.2'])} | {_f(m['select@0.5'])} | {_dr(m)} |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--split", required=True)
    ap.add_argument("--report", required=True, help="the evaluation's output URI (holds metrics.json)")
    ap.add_argument("--row", type=_pair, action="append", default=[], metavar="LABEL=RUN_URI")
    ap.add_argument("--ablation", type=_pair, action="append", default=[], metavar="LABEL=RUN_URI")
    ap.add_argument("--command", default="", help="the command that produced the tables (written above them)")
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args(argv)

    metrics = json.loads(storage.read_bytes(storage.join(args.report, "metrics.json")))
    compare = metrics["compare"]
    heur = [{"label": k, "model": "heuristic", "inputs": None, "metrics": results_of(r)}
            for k, r in compare.items() if r.get("kind") == "heuristic"]

    def rows_of(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
        rows = []
        for label, uri in pairs:
            info = inputs_of(uri)
            key = key_of(label, info, compare)
            rows.append({"label": label, "model": info["model"], "key": key, "inputs": info, "metrics": results_of(compare[key])})
        return rows

    rows, abl = rows_of(args.row), rows_of(args.ablation)
    n_steps, n_users = metrics.get("n_steps"), metrics.get("n_users")
    budgets = {r["label"]: r["inputs"] for r in rows + abl}
    same = {(i["epochs"], i["lr"], i["batch_size"], i["hidden"], i["window"], i["selection_metric"]) for i in budgets.values()}
    notes = [n for n in metrics.get("notes", []) if n.startswith("Decision layer")]
    doc = {"dataset": args.dataset, "split": args.split, "n_users": n_users, "n_steps": n_steps, "command": args.command,
           "report": args.report, "same_training_budget": len(same) == 1, "notes": notes,
           "heuristics": heur, "rows": rows, "ablation": abl}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str))

    tr = next(iter(budgets.values()), None)
    head = [f"# {args.dataset}: models compared through the same decision layer ({args.split} split)", "",
            f"{n_users} users, {n_steps} steps of the user-disjoint {args.split} split. Command: `{args.command}`", ""]
    if tr:
        head += [f"Every row trained with the same spec and budget ({tr['epochs']} epochs, lr {tr['lr']}, batch {tr['batch_size']}, "
                 f"hidden {tr['hidden']}, window {tr['window']}; checkpoint chosen on `{tr['selection_metric']}` over the val split)"
                 + ("" if len(same) == 1 else " EXCEPT where the inputs below say otherwise") + "; only `model.name` "
                 "(and, for the ablations, the one field named) differs. `history stats` = the causal running statistics of "
                 "past channels and rewards (`model.history_stats`). Bold = best in the column.", ""]
    head += [f"- {n}" for n in notes] + ([""] if notes else [])
    md = head + main_table(heur + rows) + [""]
    md += ["select@f = logged reward rate of the user-steps the decision layer serves within a budget of f × the logged cost "
           "(s solved by bisection for each budget). OPE DR = doubly-robust per-step value of the decision policy's channel "
           "choice, 95% bootstrap interval over users; `logged` value = the logged reward rate "
           f"({_f(rows[0]['metrics']['logged_value']) if rows else '–'}).", ""]
    if abl:
        md += ["## Ablations of MTORL", ""] + ablation_table([r for r in rows if r["label"] == "mtorl"] + abl) + [""]
    # The evaluation's full report (budget curves, OPE table with every estimator, warnings) and its plots.
    full = f"{out.name}-report.md"
    report_md = storage.read_bytes(storage.join(args.report, "report.md")).decode()
    for png in ("budget_curve.png", "channel_auc.png", "reliability.png"):
        uri = storage.join(args.report, png)
        if storage.exists(uri):
            (out.parent / f"{out.name}-{png}").write_bytes(storage.read_bytes(uri))
            report_md = report_md.replace(f"]({png})", f"]({out.name}-{png})")
    (out.parent / full).write_text(report_md)
    md += [f"Full evaluation report (budget curves, every OPE estimator, warnings, plots): [{full}]({full}).", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
