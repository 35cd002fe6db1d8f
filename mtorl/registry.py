"""The one table of job kinds: kind -> (job model, command name, runner).

``mtorl <command>``, ``mtorl explain``, ``mtorl submit`` and the ``ray_jobs`` entrypoints all look a
kind up here; a kind missing from :data:`REGISTRY` is refused by each of them in one line.

Every runner has the same signature, ``run(job, ctx) -> result``: the validated job, and a
:class:`RunContext` (progress sink, Ray address, the command line's run options). The result is the
JSON object ``--result`` writes. Runners import their layer on first use, so importing this module
costs only the spec models (``mtorl validate`` and ``mtorl explain`` stay cheap: no torch, no Ray).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from mtorl.spec.loader import SpecError
from mtorl.spec.models import EvaluateJob, PrepareJob, ServeJob, SimulateJob, TrainJob, TuneJob, _Job

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RunContext:
    """What a runner gets besides its job."""

    progress: Progress = print
    address: str | None = None  # Ray cluster address (None: RAY_ADDRESS, else a local Ray)
    options: Mapping[str, Any] = field(default_factory=dict)  # run options of the command line (see each runner)


Runner = Callable[[Any, RunContext], dict[str, Any]]


@dataclass(frozen=True)
class JobKind:
    kind: str            # "TrainJob"
    command: str         # `mtorl train`, `python -m ray_jobs.train`
    model: type[_Job]    # the job's pydantic model (its JSON schema is `mtorl explain KIND`)
    run: Runner


# ------------------------------------------------------------------------------------- runners

def _prepare(job: PrepareJob, ctx: RunContext) -> dict[str, Any]:
    from mtorl.data.prepare import prepare

    t0 = time.time()
    m = prepare(job.spec, progress=ctx.progress)
    sp = m.splits
    ctx.progress(f"prepared {job.spec.output}: {m.rows_read} rows read, {m.rows_written} written, "
                 f"dropped {m.rows_dropped}; users train/val/test = "
                 f"{sp['train'].users}/{sp['val'].users}/{sp['test'].users}")
    return {"kind": "PrepareJob", "dataset": job.spec.output, "version": m.version, "rows_read": m.rows_read,
            "rows_written": m.rows_written, "rows_dropped": m.rows_dropped,
            "splits": {k: {"users": v.users, "steps": v.steps} for k, v in sp.items()},
            "wall_s": round(time.time() - t0, 2)}


def _train(job: TrainJob, ctx: RunContext) -> dict[str, Any]:
    from mtorl.training.driver import run_train

    result = run_train(job, progress=ctx.progress, address=ctx.address)  # starts Ray only when the run needs it
    ctx.progress(f"run: {result['run_uri']}\nbest checkpoint: {result['best_checkpoint']}\n"
                 f"wall time {result['wall_s']} s")
    return result


def _evaluate(job: EvaluateJob, ctx: RunContext) -> dict[str, Any]:
    online = job.spec.online
    if online is not None:  # closed loop in the simulator
        from mtorl.sim.closed_loop import run_online_evaluation

        return run_online_evaluation(job.spec, users=online.users, budget=online.budget, progress=ctx.progress)
    from mtorl.evaluation.run import run_evaluate

    return run_evaluate(job.spec, progress=ctx.progress)


def _tune(job: TuneJob, ctx: RunContext) -> dict[str, Any]:
    from mtorl.raycluster import init_ray
    from mtorl.tuning.sweep import run_tune

    init_ray(ctx.address)
    return run_tune(job, progress=ctx.progress)


def _serve(job: ServeJob, ctx: RunContext) -> dict[str, Any]:
    """Options: ``target`` ("serve" | "rayservice": only write the KubeRay config), ``config_out``, ``detach``."""
    config_out = ctx.options.get("config_out")
    if ctx.options.get("target") == "rayservice":  # write the KubeRay config only (pinned checkpoint); deploy nothing
        from mtorl.serving.kuberay import write_rayservice_config

        if not config_out:
            raise SpecError("<command line>", [("--config-out", "--for rayservice writes a file: name it")])
        return write_rayservice_config(job, config_out, progress=ctx.progress)
    from mtorl.serving.app import run_serve

    return run_serve(job, address=ctx.address, config_out=config_out, blocking=not ctx.options.get("detach"),
                     progress=ctx.progress)


def _simulate(job: SimulateJob, ctx: RunContext) -> dict[str, Any]:
    from mtorl.sim.generate import simulate

    return simulate(job.spec, progress=ctx.progress)


REGISTRY: dict[str, JobKind] = {k.kind: k for k in (
    JobKind("PrepareJob", "prepare", PrepareJob, _prepare),
    JobKind("TrainJob", "train", TrainJob, _train),
    JobKind("EvaluateJob", "evaluate", EvaluateJob, _evaluate),
    JobKind("TuneJob", "tune", TuneJob, _tune),
    JobKind("ServeJob", "serve", ServeJob, _serve),
    JobKind("SimulateJob", "simulate", SimulateJob, _simulate),
)}


def lookup(kind: str, where: str = "<command line>") -> JobKind:
    """The registered kind; a ``SpecError`` line naming ``where`` when it is not registered."""
    entry = REGISTRY.get(kind)
    if entry is None:
        raise SpecError(where, [("kind", f"unknown kind {kind!r}; one of {', '.join(REGISTRY) or 'none'}")])
    return entry


def by_command(command: str) -> JobKind:
    """The kind run by ``mtorl COMMAND`` / ``python -m ray_jobs.COMMAND``; ``SpecError`` when none is."""
    for entry in REGISTRY.values():
        if entry.command == command:
            return entry
    raise SpecError("<command line>", [("command", f"no job kind is registered for {command!r}; commands: "
                                                   f"{', '.join(e.command for e in REGISTRY.values()) or 'none'}")])
