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
from mtorl.evaluation.streaming import (BatchScore, MetricSums, TrainStats, UserSample, behaviour_features,
                                        split_batches, split_tables, step_columns)
from mtorl.serving.predictor import Predictor
from mtorl.spec import DecisionSpec, EvaluateSpec

BEHAVIOUR_MAX_STEPS = 200_000  # train steps used to fit the behaviour model (a uniform subsample)
STREAM_MEMORY_FRACTION = 1 / 8  # the in-memory path may take this share of the machine's memory


def read_split(dataset_uri: str, split: str, manifest: Manifest | None = None) -> list[Journey]:
    """All journeys of a split, read shard by shard (only the manifest's shards: one version)."""
    manifest = manifest or load_manifest(dataset_uri)
    out: list[Journey] = []
    for uri in shard_uris(dataset_uri, manifest, split):
        fs, path = storage.resolve(uri)
        out.extend(journeys_from_table(pq.read_table(path, filesystem=fs), manifest))
    return out


def to_predictions(journeys: Sequence[Journey], channels: Sequence[str], binary: bool, name: str,
                   action_probs: Iterable[np.ndarray] | None = None, reward_pred: Iterable[np.ndarray] | None = None,
                   reward_std: Iterable[np.ndarray] | None = None) -> Predictions:
    """Flatten journeys (+ optional per-journey (T, C) outputs; ``reward_std``: an ensemble's spread,
    None = none) into the Predictions arrays."""
    C = len(channels)
    n = sum(j.length for j in journeys)
    cat = lambda xs: np.concatenate(list(xs)) if n else np.zeros(0)  # noqa: E731
    ap = np.concatenate(list(action_probs)) if action_probs is not None and n else np.full((n, C), 1.0 / C)
    rp = np.concatenate(list(reward_pred)) if reward_pred is not None and n else np.zeros((n, C))
    sd = None
    if reward_std is not None:
        sd = np.concatenate(list(reward_std)) if n else np.zeros((n, C))
    return Predictions(
        user=np.repeat(np.arange(len(journeys)), [j.length for j in journeys]),
        t=cat(np.arange(j.length) for j in journeys),
        channel=cat(j.channel for j in journeys), gain=cat(j.gain for j in journeys), cost=cat(j.cost for j in journeys),
        reward=cat(j.reward for j in journeys), propensity=cat(j.propensity for j in journeys),
        action_probs=ap, reward_pred=rp, channels=list(channels), binary=binary, name=name, reward_std=sd,
    )


def model_predictions(predictor: Predictor, journeys: Sequence[Journey], name: str) -> Predictions:
    """A model's Predictions of ``journeys``; an ensemble's carry its members' spread (``reward_std``)."""
    preds = predictor.predict_journeys(journeys)
    spread = [p.reward_std for p in preds if p.reward_std is not None]   # every one (an ensemble) or none
    return to_predictions(journeys, predictor.channels, predictor.binary, name,
                          (p.action_probs for p in preds), (p.reward for p in preds),
                          spread if preds and len(spread) == len(preds) else None)


def decision_label(d: Any) -> str:
    """One line naming the decision policy and its strength (for reports)."""
    if d.policy == "imitation":
        return "imitation (the action decoder's pi-reweighted channel)"
    g, b = float(d.channel_cost_weight), float(d.ensemble_pessimism)
    return (f"reward (argmax of the reward head; support threshold tau = {d.support_threshold:g}, pessimism beta = {d.pessimism:g}"
            + (f", ensemble pessimism beta_e = {b:g}" if b != 0.0 else "")
            + (f", channel cost weight g = {g:g}" if g != 1.0 else "") + ")")


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


def auto_stream_min_steps(state_dim: int, n_channels: int, n_rows: int, memory_bytes: float,
                          fraction: float = STREAM_MEMORY_FRACTION) -> int:
    """The default ``stream_min_steps``: the most steps (evaluated split + train) whose in-memory evaluation
    fits in ``fraction`` of ``memory_bytes``: a journey step (state D float32 + 5 fields) plus, per report row
    and the logged arrays, a `Predictions` step (7 + 2 C float64), twice over for the metrics' temporaries."""
    per_step = 4 * state_dim + 32 + 2 * 8 * (7 + 2 * n_channels) * (n_rows + 1)
    return int(fraction * memory_bytes // per_step)


def _memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _predictors(primary: Predictor, compare: Sequence[str]) -> list[tuple[str, Predictor]]:
    """[(report row key, predictor)]: the primary first; a name taken by a heuristic or an earlier row
    gets its run's label (never let two compared checkpoints overwrite each other)."""
    from mtorl.evaluation.heuristics import HEURISTICS

    out: list[tuple[str, Predictor]] = []
    taken = set(HEURISTICS)
    for pr in [primary] + [Predictor.from_checkpoint(uri) for uri in compare]:
        if pr.channels != primary.channels:
            raise ValueError(f"{pr.uri}: channel vocabulary {pr.channels} differs from {primary.channels}")
        key = pr.name if pr.name not in taken else f"{pr.name}@{run_label(pr.uri)}"
        while key in taken:
            key += "'"
        taken.add(key)
        out.append((key, pr))
    return out


def _mode(spec: EvaluateSpec, data_uri: str, primary: Predictor, n_rows: int) -> tuple[bool, str]:
    """(stream?, the line saying which mode runs and why)."""
    m = load_manifest(data_uri)
    ev, tr = m.split(data_uri, spec.split).steps, m.split(data_uri, "train").steps
    limit = spec.stream_min_steps
    if limit is None:
        limit = auto_stream_min_steps(m.state_dim, len(primary.channels), n_rows, _memory_bytes())
    if ev > spec.exact_max_steps:
        return True, (f"streaming in batches of users ({spec.split} split {ev:,} steps > exact_max_steps "
                      f"{spec.exact_max_steps:,}: exact sufficient statistics, a uniform user sample for AUC, "
                      "budget curve and OPE)")
    if ev + tr > limit:
        return True, (f"streaming in batches of users ({spec.split} + train {ev + tr:,} steps > {limit:,}; "
                      "every number exact)")
    return False, f"in memory ({spec.split} + train {ev + tr:,} steps <= {limit:,})"


def run_evaluate(spec: EvaluateSpec, progress: Any = print) -> dict[str, Any]:
    t0 = time.time()
    primary = Predictor.from_checkpoint(spec.checkpoint)
    data_uri = spec.data or primary.meta.manifest_uri
    predictors = _predictors(primary, spec.compare)
    decision = DecisionSpec.of_job(primary.meta.spec, spec.decision)
    stream, mode = (False, "in memory (raw logs)") if spec.input else _mode(spec, data_uri, primary, len(predictors) + 2)
    progress(f"evaluation: {mode}")
    evaluate = _evaluate_streaming if stream else _evaluate_in_memory
    where, results, notes = evaluate(spec, data_uri, primary, predictors, decision, progress)
    primary_key = predictors[0][0]
    history = primary.meta.history or None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if spec.output.startswith("s3://") else Path(spec.output)
        paths = write_report(str(local), results, primary=primary_key, notes=notes, history=history)
        paths.append(write_html(str(local)))  # report.html: the same report as one self-contained page
        out = _write_out(local, spec.output)
    top = results[primary_key]
    summary = {
        "kind": "EvaluateJob", "checkpoint": primary.uri, "evaluated_on": where, "output": out, "mode": mode,
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


def _notes(where: str) -> list[str]:
    return [f"Evaluated on {where}. Splits are by user (stable hash of the user id): these users were never seen in training.",
            "Predictions at step t use only the journey before t and the current state s_t."]


def _behaviour_note(fitted: bool) -> str:
    return ("Behaviour policy for OPE: multinomial logistic regression fitted on the train split (no logged propensities)."
            if fitted else "Behaviour policy for OPE: the logged propensities.")


def _decision_note(decision: Any) -> str:
    return (f"Decision layer (every row, heuristics included): {decision_label(decision)}; budget curves solve the "
            "penalty s for each budget (the budget's Lagrange multiplier); the OPE greedy policy is the channel choice "
            f"at s = {decision.penalty or 0.0:g}.")


def _evaluate_in_memory(spec: EvaluateSpec, data_uri: str, primary: Predictor, predictors: list[tuple[str, Predictor]],
                        decision: Any, progress: Any) -> tuple[str, dict[str, Any], list[str]]:
    """Both splits read whole: the reference the streaming path must equal."""
    manifest = primary.manifest
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
    notes = _notes(where)
    if not np.isfinite(logged.propensity).all():
        X = behaviour_features(train, len(primary.channels))
        c = train_p.channel
        if len(c) > BEHAVIOUR_MAX_STEPS:
            keep = np.random.default_rng(spec.seed).choice(len(c), BEHAVIOUR_MAX_STEPS, replace=False)
            X, c = X[keep], c[keep]
        bm = fit_behaviour_model(X, c, n_channels=len(primary.channels), seed=spec.seed)
        behaviour_probs = bm.predict_proba(behaviour_features(journeys, len(primary.channels)))
    notes.append(_behaviour_note(behaviour_probs is not None))
    del train, train_p

    all_preds: dict[str, Predictions] = dict(heuristic_predictions(logged, prior))
    for key, pr in predictors:
        progress(f"scoring {key} ({pr.uri})")
        all_preds[key] = model_predictions(pr, journeys, key)
    notes.append(_decision_note(decision))
    results = {key: evaluate_predictions(p, spec.budget_fractions, n_boot=spec.bootstrap, seed=spec.seed,
                                         behaviour_probs=behaviour_probs, decision=decision)
               for key, p in all_preds.items()}
    return where, results, notes


def _take(p: Predictions, keep: np.ndarray) -> Predictions:
    """The steps ``keep`` (N,) bool of ``p``."""
    if keep.all():
        return p
    arrays = {k: getattr(p, k)[keep] for k in ("user", "t", "channel", "gain", "cost", "reward", "propensity",
                                               "action_probs", "reward_pred")}
    return Predictions(**arrays, channels=p.channels, binary=p.binary, name=p.name,
                       reward_std=None if p.reward_std is None else p.reward_std[keep])


def score_batch(batch: Sequence[Journey], channels: Sequence[str], binary: bool, prior: HistoryPrior,
                predictors: Sequence[tuple[str, Predictor]], sample: UserSample) -> BatchScore:
    """One batch of whole users scored by the heuristics and every model: exact metric sums over all its steps,
    the predictions of its sampled users, and their behaviour features when a propensity is missing."""
    logged = to_predictions(batch, channels, binary, "logged")
    rows: dict[str, Predictions] = dict(heuristic_predictions(logged, prior))
    for key, pr in predictors:
        rows[key] = model_predictions(pr, batch, key)
    keep_user = sample.keep([j.user_id for j in batch])
    keep = np.repeat(keep_user, [j.length for j in batch])
    sums = {}
    for k, p in rows.items():
        sums[k] = MetricSums(len(channels), binary)
        sums[k].add(p)
    kept = [j for j, y in zip(batch, keep_user) if y]
    features = None if np.isfinite(logged.propensity).all() else behaviour_features(kept, len(channels))
    return BatchScore(users=len(batch), kept_users=len(kept), sums=sums,
                      parts={k: _take(p, keep) for k, p in rows.items()}, features=features)


def _evaluate_streaming(spec: EvaluateSpec, data_uri: str, primary: Predictor, predictors: list[tuple[str, Predictor]],
                        decision: Any, progress: Any) -> tuple[str, dict[str, Any], list[str]]:
    """Both splits read in batches of whole users (see `mtorl.evaluation.streaming`)."""
    from mtorl.evaluation.heuristics import HEURISTICS

    m = load_manifest(data_uri)
    where = f"the {spec.split} split of {data_uri}"
    ev, tr = m.split(data_uri, spec.split), m.split(data_uri, "train")
    if not ev.users:
        raise ValueError(f"nothing to evaluate in {where}")
    channels, binary, C = primary.channels, primary.binary, len(primary.channels)
    progress(f"evaluating on {where}: {ev.users} users, {ev.steps} steps (train: {tr.steps} steps, read for the "
             "heuristics' priors and the behaviour model)")

    # the behaviour rows are kept in this pass only when no propensity is logged; a split that logs some but
    # lacks one on a step reads train a second time for them (rare)
    ts = TrainStats(C, binary, tr.steps, BEHAVIOUR_MAX_STEPS, spec.seed, collect=not m.has_propensity)
    if ts.collect:
        for batch in split_batches(data_uri, m, "train"):
            ts.add(batch)
    else:  # the prior needs two columns: no states are built
        for uri, table in split_tables(data_uri, m, "train"):
            ts.add_steps(*step_columns(uri, table, m, binary))
            del table
    prior = ts.prior()

    rate = 1.0 if ev.steps <= spec.exact_max_steps else spec.exact_max_steps / ev.steps
    sample = UserSample(rate, spec.seed)
    keys = [*HEURISTICS, *(k for k, _ in predictors)]
    sums = {k: MetricSums(C, binary) for k in keys}
    parts: dict[str, list[Predictions]] = {k: [] for k in keys}
    behaviour: list[np.ndarray] = []
    bm = None
    done_users = kept_users = 0
    if ev.steps > spec.ray_min_steps:
        from mtorl.evaluation.distributed import score_split_ray

        progress(f"scoring with Ray Data ({spec.split} split {ev.steps:,} steps > ray_min_steps {spec.ray_min_steps:,}: "
                 "one map_batches task per shard, the models loaded once per worker)")
        scored: Iterable[BatchScore] = score_split_ray(data_uri, m, spec.split, [(k, pr.uri) for k, pr in predictors],
                                                       channels, binary, prior, sample)
    else:
        progress(f"scoring on this process ({spec.split} split {ev.steps:,} steps <= ray_min_steps {spec.ray_min_steps:,})")
        scored = (score_batch(b, channels, binary, prior, predictors, sample) for b in split_batches(data_uri, m, spec.split))
    for bs in scored:
        for k in keys:
            sums[k].merge(bs.sums[k])
            parts[k].append(bs.parts[k])
        if bs.features is not None:  # a step of this batch has no logged propensity
            if bm is None:
                if not ts.collect:
                    ts = TrainStats(C, binary, tr.steps, BEHAVIOUR_MAX_STEPS, spec.seed)
                    for train_batch in split_batches(data_uri, m, "train"):
                        ts.add(train_batch)
                X, c = ts.behaviour_rows(where)
                bm = fit_behaviour_model(X, c, n_channels=C, seed=spec.seed)
            behaviour.append(bm.predict_proba(bs.features) if len(bs.features) else np.zeros((0, C)))
        else:  # every propensity of the batch is logged: the fitted ones are never read
            behaviour.append(np.full((bs.parts[keys[0]].n_steps, C), 1.0 / C))
        done_users += bs.users
        kept_users += bs.kept_users
        progress(f"  scored {done_users:,} / {ev.users:,} users ({', '.join(keys)})")
    behaviour_probs = np.concatenate(behaviour) if bm is not None else None
    notes = _notes(where)
    notes.append(_behaviour_note(bm is not None))
    notes.append(_decision_note(decision))
    if rate < 1.0:
        notes.append(f"The {spec.split} split has {ev.steps:,} steps (> exact_max_steps {spec.exact_max_steps:,}): "
                     "accuracy, macro precision/recall/F1, logloss, Brier, ECE, reliability, MSE/MAE, base rate and "
                     f"counts are exact over every step; AUCs, Spearman, the budget curve and OPE (values and "
                     f"intervals) are computed on a seeded uniform sample of {kept_users:,} users "
                     f"({sum(p.n_steps for p in parts[keys[0]]):,} steps).")
    results: dict[str, Any] = {}
    for k in keys:
        p = Predictions.concat(parts[k], name=k, renumber_users=True)
        parts[k] = []
        r = evaluate_predictions(p, spec.budget_fractions, n_boot=spec.bootstrap, seed=spec.seed,
                                 behaviour_probs=behaviour_probs, decision=decision)
        results[k] = sums[k].apply(r) if rate < 1.0 else r
    return where, results, notes


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.3f}"
