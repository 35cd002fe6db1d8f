"""Ray Tune sweeps over the task weighting (μ, λ, and optionally lr / model size).

Train V2 + Tune: every trial is a small driver function that builds a real ``TorchTrainer`` and
reports through ``TuneReportCallback`` (``Tuner(trainer)`` is deprecated). The trial driver itself
takes 0.01 CPU so trials never deadlock with their training workers on a 2-core machine.
With ``trainer.workers: 0`` in the base, a trial runs the training loop in its own process instead (it takes
the worker's CPU), without a Ray Train controller, worker and their helper actors per trial: the same
epochs, checkpoints and W&B run, without the fault tolerance of Ray Train's restarts.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import yaml

from ray.tune import Callback
from ray.tune.stopper import Stopper

from mtorl import faults
from mtorl import storage
from mtorl.console import as_console, current, tune_verbosity
from mtorl.spec import TrainJob, TuneJob, job_to_dict, validate_doc
from mtorl.spec.loader import apply_overrides
from mtorl.spec.models import ParamSpace, TuneSpec
from mtorl.training.checkpoint import BEST_FILE, META_FILE, CheckpointMeta
from mtorl.training.driver import (build_trainer, finish_run, loop_plan, prestart_autoscaling_coordinator, storage_args,
                                   to_uri)

SEP = "__"  # Tune config keys can't hold dots reliably: objective.reward_weight -> objective__reward_weight


def _key(path: str) -> str:
    return path.replace(".", SEP)


def _path(key: str) -> str:
    return key.replace(SEP, ".")


def search_space(spec: TuneSpec) -> dict[str, Any]:
    """Tune domains from the spec's feasible spaces (grid: the listed values, or 3 points per range)."""

    space: dict[str, Any] = {}
    for path, p in spec.parameters.items():
        space[_key(path)] = _domain(p, spec.algorithm)
    return space


def _domain(p: ParamSpace, algorithm: str) -> Any:
    import numpy as np
    from ray import tune

    if algorithm == "grid":
        if p.values is not None:
            return tune.grid_search(list(p.values))
        assert p.min is not None and p.max is not None
        pts = np.geomspace(p.min, p.max, 3) if p.log and p.min > 0 else np.linspace(p.min, p.max, 3)
        return tune.grid_search([int(round(x)) if p.type == "int" else float(x) for x in pts])
    if p.type == "categorical" or p.values is not None:
        return tune.choice(list(p.values or []))
    assert p.min is not None and p.max is not None
    if p.type == "int":
        return tune.lograndint(int(p.min), int(p.max) + 1) if p.log else tune.randint(int(p.min), int(p.max) + 1)
    return tune.loguniform(p.min, p.max) if p.log and p.min > 0 else tune.uniform(p.min, p.max)


def trial_job(base: TrainJob, config: dict[str, Any], name: str, output: str) -> TrainJob:
    doc = job_to_dict(base)
    doc["metadata"]["name"] = name
    doc["spec"]["output"] = output
    doc = apply_overrides(doc, [f"spec.{_path(k)}={json.dumps(v)}" for k, v in config.items()])
    return validate_doc(doc, f"<trial {name}>")


def _make_trial_fn(base_doc: dict[str, Any], trials_uri: str, sweep_name: str, group: str, kill_pid: int | None = None) -> Any:
    # W&B settings of this sweep's driver (mode, dir), for the trial's workers: the trial process
    # itself has the environment of the Ray job, which may predate them.
    wandb_env = {k: v for k, v in os.environ.items() if k.startswith("WANDB_") and k != "WANDB_API_KEY"}

    def trial(config: dict[str, Any]) -> None:
        import ray.tune
        from ray.tune.integration.ray_train import TuneReportCallback

        os.environ.update(wandb_env)

        base = validate_doc(base_doc, "<tune base>")
        trial_id = ray.tune.get_context().get_trial_id()
        name = f"{sweep_name}-{trial_id}".lower().replace("_", "-")
        doc = job_to_dict(trial_job(base, config, name, trials_uri))
        doc["spec"]["tracking"]["group"] = group
        job = validate_doc(doc, f"<trial {name}>")
        run_dir = storage.join(trials_uri, name)
        # A restored sweep restarts the trial function of a trial whose driver died. Tune must see the
        # epochs that already ran, or it would see a finished trial with no metric (or fewer epochs).
        for metrics in previous_history(run_dir):
            ray.tune.report(metrics)
        if storage.exists(storage.join(run_dir, BEST_FILE)):
            return  # completed before the driver died: its best.json is the record; nothing is re-run
        if job.spec.trainer.workers == 0:  # the loop in this process: no Ray Train controller or workers
            from mtorl.storage.credentials import export_to_environ
            from mtorl.training.worker import TrialSession, train_loop

            export_to_environ()  # WANDB_API_KEY from the credentials file, when this process lacks it
            plan = loop_plan(job)
            train_loop(plan.config, TrialSession(plan.datasets))  # resumes from the run's latest checkpoint
            result = None
        else:
            trainer, _ = build_trainer(job, callbacks=[TuneReportCallback()])
            result = trainer.fit()  # resumes from the run's latest checkpoint, if any
        finish_run(job, result, run_dir)  # writes the trial's best.json
        if kill_pid is not None:
            os.kill(kill_pid, signal.SIGKILL)

    return trial


def trial_resources(base: TrainJob) -> dict[str, float]:
    """A trial's own resources: 0.01 CPU for the small driver of its Ray Train run (the workers hold the
    real ones), or, with ``trainer.workers: 0``, the one worker's CPU (and GPU) for the loop it runs itself."""
    t = base.spec.trainer
    if t.workers > 0:
        return {"CPU": 0.01}
    return {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}


def previous_history(run_dir: str) -> list[dict[str, Any]]:
    """Per-epoch metrics recorded in the run's latest checkpoint (empty for a fresh run)."""
    if not storage.exists(run_dir):
        return []
    latest: CheckpointMeta | None = None
    for f in storage.list_files(run_dir):
        if f.endswith("/" + META_FILE):
            meta = CheckpointMeta.parse(storage.read_json(f), f)
            if latest is None or meta.epoch > latest.epoch:
                latest = meta
    return list(latest.history) if latest else []


class TrialProgress(Callback):
    """The sweep's progress display (in the driver): one step per finished trial, with the best so far;
    off a terminal, one line per trial result (epoch) and per finished trial."""

    def __init__(self, progress: Any, trials: int, metric: str, mode: str) -> None:
        self.console = current() or as_console(progress)  # a command's display, whatever gets the detail lines
        self.metric, self.mode, self.trials = metric, mode, trials
        self.bar: Any = None
        self.best: tuple[float, str] | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its run config: the display stays in this process
        return {k: v for k, v in self.__dict__.items() if k not in ("console", "bar")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, console=current() or as_console(None), bar=None)

    def _best(self) -> str:
        return "no result yet" if self.best is None else f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})"

    def setup(self, **info: Any) -> None:  # the sweep starts: the display's clock starts
        if self.bar is None:
            self.bar = self.console.progress(self.trials, "trials", unit="trial")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        if self.bar is None:
            self.bar = self.console.progress(self.trials, "trials", unit="trial")
        v = result.get(self.metric)
        if isinstance(v, (int, float)):
            if self.best is None or (v > self.best[0] if self.mode == "max" else v < self.best[0]):
                self.best = (float(v), str(trial.trial_id))
            if not self.console.tty:
                self.bar.note(f"  trial {trial.trial_id} epoch {result.get('training_iteration')}: {self.metric} {v:.4f}; {self._best()}")
        if self.bar.bar is not None:
            self.bar.bar.set_postfix_str(self._best())

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finished(trial, "done")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finished(trial, "failed")

    def _finished(self, trial: Any, how: str) -> None:
        if self.bar is None:
            self.bar = self.console.progress(self.trials, "trials", unit="trial")
        self.bar.update(1, postfix=f"trial {trial.trial_id} {how}; {self._best()}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class GoalStopper(Stopper):
    """Stops the whole sweep once any trial reaches the objective's goal."""

    def __init__(self, metric: str, mode: str, goal: float | None):
        self.metric, self.mode, self.goal, self.reached = metric, mode, goal, False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        v = result.get(self.metric)
        if self.goal is not None and v is not None and (v >= self.goal if self.mode == "max" else v <= self.goal):
            self.reached = True
        return False

    def stop_all(self) -> bool:
        return self.reached


def run_tune(job: TuneJob, progress: Any = print) -> dict[str, Any]:
    import ray.tune as tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
    from ray.tune.search import BasicVariantGenerator
    spec = job.spec
    t0 = time.time()
    base = TrainJob(apiVersion="mtorl/v1", kind="TrainJob", metadata={"name": job.metadata.name}, spec=spec.base)
    sweep_uri = storage.join(spec.output, job.metadata.name)
    trials_uri = storage.join(sweep_uri, "trials")
    storage_path, fs = storage_args(spec.output)
    if fs is not None:  # Tune pickles this into its experiment state: no keys in it (the SDK finds them)
        fs = storage.pyarrow_s3_keyless()
    group = spec.base.tracking.group or job.metadata.name
    metric, mode = spec.objective.metric, spec.objective.mode
    epochs = spec.base.trainer.epochs

    from mtorl.training.driver import check_train_resources

    check_train_resources(base)  # one trial must fit (parallel_trials beyond that just wait their turn)
    if spec.base.trainer.workers == 0:
        from mtorl.raycluster import check_resources

        check_resources(trial_resources(base), 1, f"an in-process trial (trainer.workers=0) with "
                        f"cpus_per_worker={spec.base.trainer.cpus_per_worker:g}")
    from mtorl.data.pipeline import load_manifest

    load_manifest(spec.base.data)  # a missing dataset is one line here, not a traceback from every trial
    kill_pid = os.getpid() if faults.enabled("tune.kill_driver_after_trial") else None  # off unless a test enables it
    trainable = tune.with_resources(_make_trial_fn(job_to_dict(base), trials_uri, job.metadata.name, group, kill_pid),
                                    trial_resources(base))
    if spec.early_stopping == "asha":
        scheduler: Any = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=spec.grace_period, reduction_factor=2)
    elif spec.early_stopping == "median":
        scheduler = MedianStoppingRule(time_attr="training_iteration", grace_period=spec.grace_period, min_samples_required=2)
    else:
        scheduler = FIFOScheduler()
    if spec.algorithm == "tpe":
        from ray.tune.search.optuna import OptunaSearch

        search_alg: Any = OptunaSearch(seed=spec.seed)
    else:
        search_alg = BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.parallel_trials)

    # W&B: each trial's rank-0 worker opens the trial's one run (id from the sweep name and the trial id,
    # see mtorl.training.tracking), so no WandbLoggerCallback here: it would open a second run per trial.
    trial_progress = TrialProgress(progress, spec.trials, metric, mode)
    callbacks: list[Any] = [trial_progress]
    exp_path = f"{storage_path.rstrip('/')}/{job.metadata.name}/tune"
    restored = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if restored:
        progress(f"resuming sweep {job.metadata.name} from {to_uri(spec.output, exp_path)} (completed trials are not re-run)")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        progress(f"sweep {job.metadata.name}: {spec.trials} trial(s), {spec.algorithm} search, {spec.early_stopping} early stopping")
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(spec),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=search_alg, scheduler=scheduler,
                                        num_samples=1 if spec.algorithm == "grid" else spec.max_trials,
                                        # BasicVariantGenerator takes its own max_concurrent (Tune ignores this one with it)
                                        max_concurrent_trials=spec.parallel_trials if spec.algorithm == "tpe" else None),
            run_config=tune.RunConfig(name="tune", storage_path=f"{storage_path.rstrip('/')}/{job.metadata.name}",
                                      storage_filesystem=fs, stop=GoalStopper(metric, mode, spec.objective.goal), callbacks=callbacks,
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=tune_verbosity()),
        )
    from mtorl.storage.credentials import secrets_out_of_environ

    if spec.base.trainer.workers > 0:  # every trial's Train controller asks it for resources on start
        prestart_autoscaling_coordinator()
    try:
        with secrets_out_of_environ():  # Tune copies AWS_* keys into every trial's (logged) runtime_env
            results = tuner.fit()
    finally:
        trial_progress.close()
    return summarize(job, results, sweep_uri, trials_uri, time.time() - t0, restored, progress)


def _state(r: Any, epochs: int) -> str:
    if r.error is not None:
        return "failed"
    it = (r.metrics or {}).get("training_iteration", 0)
    return "completed" if it >= epochs else "stopped early"


def summarize(job: TuneJob, results: Any, sweep_uri: str, trials_uri: str, wall: float, restored: bool, progress: Any) -> dict[str, Any]:
    spec = job.spec
    metric, mode = spec.objective.metric, spec.objective.mode
    rows = []
    for r in results:
        m = r.metrics or {}
        cfg = {_path(k): v for k, v in (r.config or {}).items()}
        hist = r.metrics_dataframe
        best_v = None
        if hist is not None and metric in hist:
            col = hist[metric].dropna()
            if len(col):
                best_v = float(col.max() if mode == "max" else col.min())
        rows.append({"trial": m.get("trial_id") or os.path.basename(str(r.path)), "config": cfg,
                     "mu": cfg.get("objective.reward_weight", spec.base.objective.reward_weight),
                     "lambda": cfg.get("objective.pref_weight", spec.base.objective.pref_weight),
                     "metric": best_v, "epochs": m.get("training_iteration", 0),
                     "state": _state(r, spec.base.trainer.epochs), "error": str(r.error)[:300] if r.error else None})
    ok = [r for r in rows if r["metric"] is not None]
    ok.sort(key=lambda r: r["metric"], reverse=mode == "max")
    failed = sum(r["state"] == "failed" for r in rows)
    out: dict[str, Any] = {"kind": "TuneJob", "name": job.metadata.name, "sweep_uri": sweep_uri, "metric": metric, "mode": mode,
                           "trials": len(rows), "failed_trials": failed, "restored": restored, "leaderboard": rows, "wall_s": round(wall, 2)}
    if ok:
        best = ok[0]
        name = f"{job.metadata.name}-{best['trial']}".lower().replace("_", "-")
        base = TrainJob(apiVersion="mtorl/v1", kind="TrainJob", metadata={"name": f"{job.metadata.name}-best"}, spec=spec.base)
        best_job = trial_job(base, {_key(k): v for k, v in best["config"].items()}, f"{job.metadata.name}-best", spec.base.output)
        best_yaml = f"# mtorl train best-trainjob.yaml\n# best of sweep {job.metadata.name}: {metric}={best['metric']}\n" + yaml.safe_dump(job_to_dict(best_job), sort_keys=False)
        storage.write_bytes(storage.join(sweep_uri, "best-trainjob.yaml"), best_yaml.encode())
        best_ptr = storage.join(trials_uri, name, BEST_FILE)
        out["best"] = {"trial": best["trial"], "config": best["config"], "metric": best["metric"],
                       "checkpoint": storage.read_json(best_ptr)["checkpoint"] if storage.exists(best_ptr) else None,
                       "trainjob_yaml": storage.join(sweep_uri, "best-trainjob.yaml")}
        storage.write_json(storage.join(sweep_uri, BEST_FILE), {"checkpoint": out["best"]["checkpoint"], "metric": metric, "value": best["metric"]})
    storage.write_json(storage.join(sweep_uri, "leaderboard.json"), rows)
    md = ["| trial | μ | λ | other parameters | " + metric + " | epochs | state |", "|---|---|---|---|---|---|---|"]
    for r in ok + [r for r in rows if r["metric"] is None]:
        other = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["config"].items()
                          if k not in ("objective.reward_weight", "objective.pref_weight"))
        md.append(f"| {r['trial']} | {r['mu']:.4g} | {r['lambda']:.4g} | {other} | "
                  f"{'' if r['metric'] is None else format(r['metric'], '.4f')} | {r['epochs']} | {r['state']} |")
    storage.write_bytes(storage.join(sweep_uri, "leaderboard.md"), ("\n".join(md) + "\n").encode())
    png = _plot(rows, metric)
    if png:
        storage.write_bytes(storage.join(sweep_uri, "metric_mu_lambda.png"), png)
        out["plot"] = storage.join(sweep_uri, "metric_mu_lambda.png")
    progress("\n".join(md))
    progress(f"leaderboard: {storage.join(sweep_uri, 'leaderboard.md')}")
    if "best" in out:
        progress(f"best: {out['best']['config']} {metric}={out['best']['metric']:.4f}\n  checkpoint: {out['best']['checkpoint']}\n  ready-to-run TrainJob: {out['best']['trainjob_yaml']}")
    if failed > spec.max_failed_trials:
        raise RuntimeError(f"{failed} trial(s) failed (max_failed_trials={spec.max_failed_trials}); first error: "
                           f"{next(r['error'] for r in rows if r['error'])}")
    return out


def _plot(rows: list[dict[str, Any]], metric: str) -> bytes | None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["metric"] is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    sc = ax.scatter([r["mu"] for r in pts], [r["lambda"] for r in pts], c=[r["metric"] for r in pts], cmap="viridis", s=80, edgecolors="k")
    fig.colorbar(sc, label=metric)
    ax.set_xscale("log") if min(r["mu"] for r in pts) > 0 else None
    ax.set_xlabel("μ (reward weight)")
    ax.set_ylabel("λ (preference weight)")
    ax.set_title(f"{metric} over (μ, λ)")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
