"""EvaluateJob glue: checkpoint(s) + full user journeys -> Predictions -> metrics, report, plots.

Every step of every user in the split is scored, with the prediction at t made from the history
before t (the models are causal and read whole journeys). Splits are by user, so the test users were
never seen in training. The history heuristics are always in the comparison.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq

from mtorl import storage
from mtorl.data.manifest import Manifest, load_manifest, shard_uris
from mtorl.data.prepare import load_journeys
from mtorl.data.windows import Journey, journeys_from_table
from mtorl.evaluation.heuristics import HistoryPrior, heuristic_predictions
from mtorl.evaluation.ope import fit_behaviour_model
from mtorl.evaluation.predictions import Predictions, outcome
from mtorl.evaluation.html import write_html
from mtorl.evaluation.report import evaluate_predictions, to_jsonable, write_report
from mtorl.serving.predictor import Predictor
from mtorl.spec import DecisionSpec, EvaluateSpec

BEHAVIOUR_MAX_STEPS = 200_000  # train steps used to fit the behaviour model (a uniform subsample)


def read_split(dataset_uri: str, split: str, manifest: Manifest | None = None) -> list[Journey]:
    """All journeys of a split, read shard by shard (only the manifest's shards: one version)."""
    manifest = manifest or load_manifest(dataset_uri)
    out: list[Journey] = []
    for uri in shard_uris(dataset_uri, manifest, split):
        fs, path = storage.resolve(uri)
        out.extend(journeys_from_table(pq.read_table(path, filesystem=fs), manifest))
    return out


def to_predictions(journeys: Sequence[Journey], channels: Sequence[str], binary: bool, name: str,
                   action_probs: Iterable[np.ndarray] | None = None, reward_pred: Iterable[np.ndarray] | None = None) -> Predictions:
    """Flatten journeys (+ optional per-journey (T, C) outputs) into the Predictions arrays."""
    C = len(channels)
    n = sum(j.length for j in journeys)
    cat = lambda xs: np.concatenate(list(xs)) if n else np.zeros(0)  # noqa: E731
    ap = np.concatenate(list(action_probs)) if action_probs is not None and n else np.full((n, C), 1.0 / C)
    rp = np.concatenate(list(reward_pred)) if reward_pred is not None and n else np.zeros((n, C))
    return Predictions(
        user=np.repeat(np.arange(len(journeys)), [j.length for j in journeys]),
        t=cat(np.arange(j.length) for j in journeys),
        channel=cat(j.channel for j in journeys), gain=cat(j.gain for j in journeys), cost=cat(j.cost for j in journeys),
        reward=cat(j.reward for j in journeys), propensity=cat(j.propensity for j in journeys),
        action_probs=ap, reward_pred=rp, channels=list(channels), binary=binary, name=name,
    )


def behaviour_features(journeys: Sequence[Journey], n_channels: int) -> np.ndarray:
    """Context of the logging decision at t: s_t and one-hot(a_{t−1})."""
    rows = []
    for j in journeys:
        prev = np.zeros((j.length, n_channels), dtype=np.float32)
        if j.length > 1:
            prev[np.arange(1, j.length), j.channel[:-1]] = 1.0
        rows.append(np.concatenate([j.state, prev], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, n_channels))


def model_predictions(predictor: Predictor, journeys: Sequence[Journey], name: str) -> Predictions:
    preds = predictor.predict_journeys(journeys)
    return to_predictions(journeys, predictor.channels, predictor.binary, name,
                          (p.action_probs for p in preds), (p.reward for p in preds))


def decision_label(d: Any) -> str:
    """One line naming the decision policy and its strength (for reports)."""
    if d.policy == "imitation":
        return "imitation (the action decoder's pi-reweighted channel)"
    return f"reward (argmax of the reward head; support threshold tau = {d.support_threshold:g}, pessimism beta = {d.pessimism:g})"


def run_label(checkpoint_uri: str) -> str:
    """The run's name for a checkpoint URI (``.../RUN/checkpoint_*`` -> RUN), else the last path part."""
    path = Path(checkpoint_uri.rstrip("/"))
    return path.parent.name if path.name.startswith("checkpoint") and path.parent.name else path.name


def _write_out(local_dir: Path, output: str) -> str:
    if not output.startswith("s3://"):
        return str(local_dir)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            storage.write_bytes(storage.join(output, str(f.relative_to(local_dir))), f.read_bytes())
    return output


def run_evaluate(spec: EvaluateSpec, progress: Any = print) -> dict[str, Any]:
    t0 = time.time()
    primary = Predictor.from_checkpoint(spec.checkpoint)
    manifest = primary.manifest
    data_uri = spec.data or primary.meta.manifest_uri
    if spec.input:
        source = spec.source or manifest.source
        journeys = load_journeys(source, spec.input, manifest, progress=progress)
        where = f"raw logs {spec.input} ({source}), preprocessed with the checkpoint's manifest"
    else:
        journeys = read_split(data_uri, spec.split)
        where = f"the {spec.split} split of {data_uri}"
    if not journeys:
        raise ValueError(f"nothing to evaluate in {where}")
    progress(f"evaluating on {where}: {len(journeys)} users, {sum(j.length for j in journeys)} steps")

    train = read_split(data_uri, "train")
    logged = to_predictions(journeys, primary.channels, primary.binary, "logged")
    train_p = to_predictions(train, primary.channels, primary.binary, "train")
    prior = HistoryPrior.fit(train_p.channel, outcome(train_p), len(primary.channels))

    behaviour_probs = None
    notes = [f"Evaluated on {where}. Splits are by user (stable hash of the user id): these users were never seen in training.",
             "Predictions at step t use only the journey before t and the current state s_t."]
    if not np.isfinite(logged.propensity).all():
        X = behaviour_features(train, len(primary.channels))
        c = train_p.channel
        if len(c) > BEHAVIOUR_MAX_STEPS:
            keep = np.random.default_rng(spec.seed).choice(len(c), BEHAVIOUR_MAX_STEPS, replace=False)
            X, c = X[keep], c[keep]
        bm = fit_behaviour_model(X, c, n_channels=len(primary.channels), seed=spec.seed)
        behaviour_probs = bm.predict_proba(behaviour_features(journeys, len(primary.channels)))
        notes.append("Behaviour policy for OPE: multinomial logistic regression fitted on the train split (no logged propensities).")
    else:
        notes.append("Behaviour policy for OPE: the logged propensities.")

    all_preds: dict[str, Predictions] = dict(heuristic_predictions(logged, prior))
    predictors = [(primary.name, primary)]
    for uri in spec.compare:
        pr = Predictor.from_checkpoint(uri)
        if pr.channels != primary.channels:
            raise ValueError(f"{uri}: channel vocabulary {pr.channels} differs from {primary.channels}")
        predictors.append((pr.name, pr))
    for name, pr in predictors:
        key = name if name not in all_preds else f"{name}@{run_label(pr.uri)}"
        while key in all_preds:  # never let two compared checkpoints overwrite each other
            key += "'"
        progress(f"scoring {key} ({pr.uri})")
        all_preds[key] = model_predictions(pr, journeys, key)
    primary_key = primary.name

    decision = DecisionSpec.of_job(primary.meta.spec, spec.decision)
    notes.append(f"Decision layer (every row, heuristics included): {decision_label(decision)}; budget curves solve the "
                 "penalty s for each budget (the budget's Lagrange multiplier); the OPE greedy policy is the channel choice "
                 f"at s = {decision.penalty or 0.0:g}.")
    results: dict[str, Any] = {}
    for key, p in all_preds.items():
        results[key] = evaluate_predictions(p, spec.budget_fractions, n_boot=spec.bootstrap, seed=spec.seed,
                                            behaviour_probs=behaviour_probs, decision=decision)
    history = primary.meta.history or None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if spec.output.startswith("s3://") else Path(spec.output)
        paths = write_report(str(local), results, primary=primary_key, notes=notes, history=history)
        paths.append(write_html(str(local)))  # report.html: the same report as one self-contained page
        out = _write_out(local, spec.output)
    top = results[primary_key]
    summary = {
        "kind": "EvaluateJob", "checkpoint": primary.uri, "evaluated_on": where, "output": out,
        "files": [os.path.basename(p) for p in paths], "wall_s": round(time.time() - t0, 2),
        "metrics": to_jsonable({k: top[k] for k in ("n_users", "n_steps", "channel", "reward", "base_rate", "budget")}),
        "compare": {k: to_jsonable({"channel_accuracy": r["channel"]["accuracy"], "macro_f1": r["channel"]["macro_f1"],
                                    "mean_auc": r["channel"]["mean_auc"], "reward_auc": r["reward"].get("auc")})
                    for k, r in results.items()},
    }
    progress(f"report: {storage.join(out, 'report.md')} (one page: {storage.join(out, 'report.html')})")
    for k, r in summary["compare"].items():
        progress(f"  {k:<12} acc {r['channel_accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}  "
                 f"mean AUC {_f(r['mean_auc'])}  reward AUC {_f(r['reward_auc'])}")
    return summary


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"
