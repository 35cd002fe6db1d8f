"""``mtorl``: one console script, thin; every command calls the layers below.

Exit codes: 0 success; 2 a known error (bad spec, arguments, data, storage, checkpoint: one line naming
file/row/field/object); 1 an unexpected failure (one line, ``--debug`` shows the traceback); 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from mtorl.spec import SpecError, load_job, validate_doc
from mtorl.spec.loader import apply_overrides


def _p(msg: str) -> None:
    from mtorl.console import say

    say(msg)  # the command's console (stays on the terminal while Ray's output goes to its log file)


VERBOSE_HELP = ("show Ray's own output (logs of Ray, Ray Data, Train, Tune, Serve and the workers) on the console; "
                "by default it goes to the Ray session's log files (path printed once). Also: MTORL_LOG_LEVEL=INFO|DEBUG")


def _common(sp: argparse.ArgumentParser, spec_required: bool = False) -> None:
    sp.add_argument("spec", nargs=None if spec_required else "?", help="job spec YAML (apiVersion mtorl/v1)")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                    help="override a field, e.g. --set spec.trainer.workers=2 (repeatable)")
    sp.add_argument("--result", metavar="FILE", help="also write the JSON result (URIs, metrics, timings) here")
    sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray on loopback)")
    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def _job(args: argparse.Namespace, kind: str, from_flags: Callable[[argparse.Namespace], dict[str, Any] | None]) -> Any:
    """The job of a run command: the spec file (``--set`` applied), else one built from the flags."""
    if args.spec:
        job = load_job(args.spec, args.overrides)
        if job.kind != kind:
            raise SpecError(args.spec, [("kind", f"this command runs {kind}, the spec is a {job.kind}")])
        return job
    spec = from_flags(args)
    if spec is None:
        raise SpecError("<command line>", [("spec", f"a {kind} spec file is required")])
    doc = {"apiVersion": "mtorl/v1", "kind": kind, "metadata": {"name": getattr(args, "name", None) or kind.lower()},
           "spec": spec}
    doc = apply_overrides(doc, args.overrides)
    return validate_doc(doc, "<command line>")


def _write_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if getattr(args, "result", None):
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(json.dumps(result, indent=2, default=str))
        _p(f"result written to {args.result}")


# ------------------------------------------------------------------------------------- commands

def store_command(action: str, dir: str | None = None, port: int | None = None) -> int:
    """``mtorl store up|status|down``: human output and the exit code: 0 ok, 1 not running (``status``), and
    for a failure the house's convention (``main``): ``error: <one line>`` on stderr, exit 2."""
    from mtorl.storage import StorageError, seaweed

    try:
        if action == "up":
            t0 = time.monotonic()
            st = seaweed.up(dir, port)
            if st.was_running:
                print(f"store already running at {st.endpoint} (pid {st.pid}, dir {st.dir})")
            else:
                print(f"store running at {st.endpoint} (pid {st.pid}, dir {st.dir}, "
                      f"ready in {time.monotonic() - t0:.1f}s)")
            print("# mtorl finds it through its state file; other tools need:")
            for line in seaweed.env_lines(st):
                print(line)
            return 0
        if action == "status":
            s = seaweed.status(dir)
            if s["running"]:
                print(f"running at {s['endpoint']} (pid {s['pid']}, dir {s['dir']}, "
                      f"{'reachable' if s['reachable'] else 'NOT reachable'})")
                return 0 if s["reachable"] else 1
            print(f"not running (dir {s['dir']})")
            return 1
        if action == "down":
            pid = seaweed.down(dir)
            print(f"stopped (pid {pid})" if pid else f"not running (dir {seaweed.store_dir(dir)})")
            return 0
        print(f"error: unknown store action {action!r}; one of up, status, down", file=sys.stderr)
        return 2
    except StorageError as e:
        from mtorl.errors import one_line

        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code


def cmd_store(args: argparse.Namespace) -> int:
    return store_command(args.action, args.dir, args.port)


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for f in args.files:
        try:
            job = load_job(f, args.overrides)
            _p(f"{f}: ok ({job.kind} {job.metadata.name})")
        except SpecError as e:
            print(str(e), file=sys.stderr)
            bad += 1
    return 2 if bad else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from mtorl.registry import lookup

    _p(json.dumps(lookup(args.kind).model.model_json_schema(by_alias=True), indent=1))
    return 0


# Each run command's spec from flags when no spec file is given (None: a spec file is required).

def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in names if getattr(args, k, None) not in (None, [], "")}


def _prepare_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    if not (args.source or args.input or args.output):
        return None
    return {"source": args.source, "input": args.input, "output": args.output,
            **_given(args, ("gain", "penalty", "on_bad_rows", "manifest_from"))}


def _evaluate_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.checkpoint:
        return None
    return {"checkpoint": args.checkpoint, "output": args.output or "eval-output",
            **_given(args, ("data", "split", "input", "source", "compare"))}


def _serve_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    return {"checkpoint": args.checkpoint, **_given(args, ("port", "host"))} if args.checkpoint else None


def _simulate_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    return {"output": args.output, **_given(args, ("users", "seed", "calibrate_from"))} if args.output else None


FLAGS: dict[str, Callable[[argparse.Namespace], dict[str, Any] | None]] = {
    "PrepareJob": _prepare_flags, "EvaluateJob": _evaluate_flags, "ServeJob": _serve_flags, "SimulateJob": _simulate_flags,
}
RUN_OPTIONS = ("target", "config_out", "detach")  # command-line-only options of `mtorl serve` (mtorl.registry)


def _with_online_flags(args: argparse.Namespace, job: Any) -> Any:
    """``mtorl evaluate --online [--users N] [--budget F]``: the flags over the spec's ``online`` (else its defaults)."""
    if job.kind != "EvaluateJob" or not (args.online or args.users is not None or args.budget is not None):
        return job
    from mtorl.spec.models import OnlineSpec

    base = job.spec.online or OnlineSpec()
    online = OnlineSpec(users=base.users if args.users is None else args.users,
                        budget=base.budget if args.budget is None else args.budget)
    return job.model_copy(update={"spec": job.spec.model_copy(update={"online": online})})


def cmd_run(args: argparse.Namespace) -> int:
    """``mtorl prepare|train|evaluate|tune|serve|simulate``: the kind's runner, from the registry."""
    from mtorl.registry import RunContext, by_command

    entry = by_command(args.command)
    job = _with_online_flags(args, _job(args, entry.kind, FLAGS.get(entry.kind, lambda _a: None)))
    options = {k: getattr(args, k) for k in RUN_OPTIONS if hasattr(args, k)}
    _write_result(args, entry.run(job, RunContext(progress=_p, address=getattr(args, "address", None), options=options)))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from mtorl.jobs import submit_job

    if args.result and not args.wait:
        raise SpecError("<command line>", [("--result", "needs --wait (or use `mtorl jobs result ID` once the job "
                                                        "has finished)")])
    job = load_job(args.spec, args.overrides)
    return 0 if submit_job(job, args.address, wait=args.wait, result_file=args.result,
                           credentials=not args.no_credentials) else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    from mtorl.jobs import jobs_action

    if args.action != "list" and not args.id:
        raise SpecError("<command line>", [("id", f"`mtorl jobs {args.action}` needs a submission id")])
    return 0 if jobs_action(args.address, args.action, args.id, follow=args.follow, result_file=args.result) else 1


def cmd_datasets(args: argparse.Namespace) -> int:
    from mtorl.data.gc import collect_garbage

    collect_garbage(args.dataset, args.delete, args.min_age_hours, progress=_p)
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from mtorl.training.ensemble import DECISION_SOURCE, combine_runs

    bad = [item for item in args.decision if "=" not in item]
    if bad:
        raise SpecError(DECISION_SOURCE, [("decision", f"{bad[0]!r} must look like KEY=VALUE, e.g. ensemble_pessimism=1")])
    try:  # KEY=VALUE, parsed as --set parses PATH=VALUE (the value is YAML); combine_runs validates the fields
        decision = apply_overrides({}, args.decision)
    except ValueError as e:
        raise SpecError(DECISION_SOURCE, [("decision", str(e))]) from None
    combine_runs(args.members, args.out, progress=_p, decision=decision)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return bench_main(args.rest)


# ------------------------------------------------------------------------------------- parser

def _prepare_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--source", choices=["kuairand-sequence", "criteo-sequence", "criteo-attribution", "journeys"])
    sp.add_argument("--input", help="input file (path or s3:// URI)")
    sp.add_argument("--output", help="dataset URI")
    sp.add_argument("--gain", help="gain column (criteo: conversion|click|attribution)")
    sp.add_argument("--penalty", type=float, help="budget penalty s")
    sp.add_argument("--on-bad-rows", dest="on_bad_rows", choices=["error", "quarantine"])
    sp.add_argument("--manifest-from", dest="manifest_from", help="reuse a dataset's or checkpoint's manifest")
    sp.add_argument("--name", help="job name (without a spec)")


def _evaluate_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--checkpoint", help="checkpoint or run URI")
    sp.add_argument("--data", help="prepared dataset URI (default: the checkpoint's)")
    sp.add_argument("--split", choices=["train", "val", "test"])
    sp.add_argument("--input", help="raw held-back logs, preprocessed with the checkpoint's manifest")
    sp.add_argument("--source", help="source of --input")
    sp.add_argument("--output", help="report directory or URI")
    sp.add_argument("--compare", nargs="*", default=[], metavar="CKPT", help="more checkpoints side by side")
    sp.add_argument("--online", action="store_true", help="closed-loop evaluation in the simulator (spec.online)")
    sp.add_argument("--users", type=int, help="--online: simulated users (spec.online.users, default 2000)")
    sp.add_argument("--budget", type=float,
                    help="--online: budget as a fraction of the logging policy's spend (spec.online.budget, default 0.3)")
    sp.add_argument("--name")


def _serve_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--checkpoint", help="checkpoint or run URI")
    sp.add_argument("--host")
    sp.add_argument("--port", type=int)
    sp.add_argument("--config-out", help="also write a Serve config YAML (serve deploy / serve run; see --for)")
    sp.add_argument("--for", dest="target", choices=["serve", "rayservice"], default="serve",
                    help="rayservice: only write --config-out for a KubeRay RayService (0.0.0.0:8000, proxy, token, pinned checkpoint)")
    sp.add_argument("--detach", action="store_true", help="deploy and return instead of blocking")
    sp.add_argument("--name")


def _simulate_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--output")
    sp.add_argument("--users", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--calibrate-from", dest="calibrate_from")
    sp.add_argument("--name")


def _no_args(sp: argparse.ArgumentParser) -> None:
    pass


# (command, help, spec file required, its own flags)
JOB_COMMANDS: tuple[tuple[str, str, bool, Callable[[argparse.ArgumentParser], None]], ...] = (
    ("prepare", "advertising logs -> CMDP trajectories dataset in object storage", False, _prepare_args),
    ("train", "data-parallel training on Ray Train (re-run resumes)", True, _no_args),
    ("evaluate", "offline (or --online, simulated) evaluation and budget allocation", False, _evaluate_args),
    ("tune", "Ray Tune sweep over the action/reward/preference weighting", True, _no_args),
    ("serve", "Ray Serve HTTP endpoints: /v1/recommend, /v1/allocate", False, _serve_args),
    ("simulate", "synthetic advertising journeys with a known ground truth", False, _simulate_args),
)

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtorl", description="Multi-task offline RL for budget-aware advertising on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("store", help="the embedded S3 object store (SeaweedFS) on 127.0.0.1")
    sp.add_argument("action", choices=["up", "status", "down"])
    sp.add_argument("--dir", help="data + state directory (default: $MTORL_STORE_DIR or ~/.mtorl/store)")
    sp.add_argument("--port", type=int, help="S3 port (default 8333)")
    sp.set_defaults(fn=cmd_store)

    sp = sub.add_parser("validate", help="validate job specs (exit 2 naming file, field and reason)")
    sp.add_argument("files", nargs="+")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("explain", help="print the JSON schema of a job kind (every field documented)")
    sp.add_argument("kind")
    sp.set_defaults(fn=cmd_explain)

    for command, help, spec_required, add_flags in JOB_COMMANDS:  # one per job kind (mtorl.registry)
        sp = sub.add_parser(command, help=help)
        _common(sp, spec_required=spec_required)
        add_flags(sp)
        sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("submit", help="submit any job spec to a Ray cluster (Ray Jobs API)")
    sp.add_argument("spec", help="job spec YAML; shipped to the cluster with every --set applied")
    sp.add_argument("--address", default=None,
                    help="Ray dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS, else the local cluster of cluster/local/up.sh)")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                    help="override a field, e.g. --set spec.trainer.workers=2 (repeatable)")
    sp.add_argument("--wait", action="store_true",
                    help="stream the logs, apply runPolicy (retries, activeDeadlineSeconds), exit 0 on Succeeded, 1 otherwise")
    sp.add_argument("--result", metavar="FILE", help="with --wait: fetch the job's result JSON from object storage into FILE")
    sp.add_argument("--no-credentials", dest="no_credentials", action="store_true",
                    help="don't forward AWS_* / WANDB_API_KEY: the cluster's nodes hold their own (e.g. a Kubernetes Secret)")
    sp.set_defaults(fn=cmd_submit)

    sp = sub.add_parser("jobs", help="list | status ID | logs ID | stop ID | result ID")
    sp.add_argument("action", choices=["list", "status", "logs", "stop", "result"])
    sp.add_argument("id", nargs="?", help="submission id (printed by mtorl submit)")
    sp.add_argument("--address", default=None, help="Ray dashboard (as for submit)")
    sp.add_argument("-f", "--follow", action="store_true", help="logs: stream until the job ends; exit 0 on Succeeded")
    sp.add_argument("--result", metavar="FILE", help="result: write the JSON to FILE instead of printing it")
    sp.set_defaults(fn=cmd_jobs)

    sp = sub.add_parser("datasets", help="gc DATASET: list (--delete: remove) version folders a killed prepare left")
    sp.add_argument("action", choices=["gc"])
    sp.add_argument("dataset", help="dataset URI (the prepare output)")
    sp.add_argument("--delete", action="store_true", help="remove them (default: only list)")
    sp.add_argument("--min-age-hours", dest="min_age_hours", type=float, default=6.0,
                    help="only folders at least this old (a running prepare's is young; default 6)")
    sp.set_defaults(fn=cmd_datasets)

    sp = sub.add_parser("ensemble", help="finished runs of one spec (other training seeds) -> one ensemble checkpoint")
    sp.add_argument("members", nargs="+", help="run or checkpoint URIs (same model spec and dataset)")
    sp.add_argument("--out", required=True, help="run URI to create; its best.json names the ensemble (written last)")
    sp.add_argument("--decision", action="append", default=[], metavar="KEY=VALUE",
                    help="set a field of the ensemble's decision: block over member 0's (what evaluate and serve act by), "
                         "e.g. --decision ensemble_pessimism=1 (repeatable; validated as the spec's decision block; "
                         "the members are untouched)")
    sp.set_defaults(fn=cmd_ensemble)

    sp = sub.add_parser("bench", help="benchmarks: ratios against plain baselines in the same run")
    sp.add_argument("rest", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_bench)
    return p


# ------------------------------------------------------------------------------------- other entry points
# `python -m mtorl.bench | mtorl.demo | mtorl.manifests | mtorl.sim.benchmark | mtorl.serving.plain` and
# cluster/local/*.sh: each module's __main__ delegates here, so every argument parser and exit code is in this file.

def bench_main(argv: list[str] | None = None) -> int:
    """``mtorl bench`` / ``python -m mtorl.bench`` (``--child WHAT ...``: one scale-stage measurement)."""
    from mtorl import bench

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        ap = argparse.ArgumentParser(prog="mtorl.bench --child")
        ap.add_argument("what", choices=["prepare", "epoch", "evaluate"])
        ap.add_argument("--checkpoint")
        ap.add_argument("--csv")
        ap.add_argument("--fmt")
        ap.add_argument("--dataset", required=True)
        ap.add_argument("--device", default="cpu")
        c = ap.parse_args(argv[1:])
        bench.run_child(c.what, c.dataset, c.csv, c.fmt, c.device, c.checkpoint)
        return 0
    ap = argparse.ArgumentParser(prog="mtorl bench", description="Benchmarks: ratios against plain baselines in the same run.")
    ap.add_argument("--stages", default=",".join(bench.STAGES), help=f"comma-separated subset of {','.join(bench.STAGES)}")
    ap.add_argument("--quick", action="store_true", help="small sizes (finishes in minutes on 2 cores); scale at 100k vs 1M steps")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the same suite on the GPU paths")
    ap.add_argument("--out", default="bench", help="folder of results.json (results-cuda.json for --device cuda)")
    ap.add_argument("--markdown", default="BENCHMARKS.md", help="file whose table section is regenerated")
    ap.add_argument("--no-markdown", action="store_true", help="leave the markdown file alone")
    ap.add_argument("--steps", type=int, help="simulated steps of the main dataset (overrides the mode)")
    ap.add_argument("--scale-steps", help="SMALL,LARGE simulated steps of the scale stage (overrides the mode)")
    ap.add_argument("--scale-epoch", action="store_true", help="time the training epoch at both scale points in --quick too")
    ap.add_argument("--compile", action="store_true", help="train stage: also time the plain loop under torch.compile")
    ap.add_argument("--requests", type=int, help="HTTP requests per concurrency level (overrides the mode)")
    ap.add_argument("--epochs", type=int, help="Ray Train epochs per train-stage run (overrides the mode)")
    ap.add_argument("--work", help="scratch folder (default: a new temp folder, removed at the end)")
    ap.add_argument("--serve-modes", default=",".join(bench.SERVE_MODES),
                    help=f"serve stage: comma-separated subset of the ingress modes {','.join(bench.SERVE_MODES)}")
    ap.add_argument("--train-workers", default="1,2",
                    help="train stage: comma-separated Ray Train worker counts (must include 1)")
    a = ap.parse_args(argv)
    try:
        workers = tuple(int(x) for x in a.train_workers.split(",") if x.strip())
    except ValueError:
        ap.error(f"--train-workers {a.train_workers!r}: expected comma-separated integers such as 1,2")
    scale = None
    if a.scale_steps:
        lo, hi = (int(x) for x in a.scale_steps.split(","))
        scale = (lo, hi)
    opts = bench.SuiteOptions(
        stages=tuple(x.strip() for x in a.stages.split(",") if x.strip()), quick=a.quick, device=a.device, out=a.out,
        markdown=a.markdown, no_markdown=a.no_markdown, steps=a.steps, scale_steps=scale, scale_epoch=a.scale_epoch,
        compile=a.compile, requests=a.requests, epochs=a.epochs, work=a.work,
        serve_modes=tuple(x.strip() for x in a.serve_modes.split(",") if x.strip()), train_workers=workers)
    command = ("python -m mtorl.bench " + " ".join(x for x in argv if not x.startswith("--work"))).strip()
    return _known_errors_as_one_line(lambda: 0 if bench.run_suite(opts, command) else 1)


def demo_main(argv: list[str] | None = None) -> int:
    """``make demo`` / ``python -m mtorl.demo``."""
    from mtorl import demo

    ap = argparse.ArgumentParser(prog="mtorl-demo", description=demo.__doc__)
    ap.add_argument("--dir", default="demo-output", help="local folder for the store, reports and results")
    ap.add_argument("--data", help="a real sample (e.g. the KuaiRand or Criteo sequence CSV); default: simulated logs")
    ap.add_argument("--source", help="source of --data (guessed from the file name)")
    ap.add_argument("--epochs", type=int, default=demo.DEMO_EPOCHS)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--keep-store", action="store_true", help="leave the object store running at the end")
    ap.add_argument("-v", "--verbose", action="store_true", help="Ray's own output and every stage's details on the console")
    a = ap.parse_args(argv)
    demo.run_demo(demo.DemoOptions(**vars(a)))
    return 0


def manifests_main(argv: list[str] | None = None) -> int:
    """``make manifests`` / ``python -m mtorl.manifests``: render the KubeRay manifests."""
    from mtorl import manifests

    ap = argparse.ArgumentParser(prog="python -m mtorl.manifests", description=(manifests.__doc__ or "").splitlines()[0])
    ap.add_argument("--values", action="append", default=[], type=Path, metavar="FILE",
                    help="KEY=VALUE file over the defaults (repeatable; later files win; the environment wins over all)")
    ap.add_argument("--defaults", type=Path, default=manifests.DEFAULT_VALUES,
                    help=f"default values (default {manifests.DEFAULT_VALUES})")
    ap.add_argument("--templates", type=Path, default=manifests.DEFAULT_TEMPLATES, help=f"default {manifests.DEFAULT_TEMPLATES}")
    ap.add_argument("--out", type=Path, default=manifests.DEFAULT_OUT, help=f"default {manifests.DEFAULT_OUT}")
    a = ap.parse_args(argv)
    try:
        values, sources = manifests.load_values([a.defaults, *a.values])
        for path in manifests.write(manifests.render(a.templates, values, sources), a.out):
            print(f"wrote {path}")
    except manifests.ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"apply one with: kubectl apply -f {a.out}/<file>.yaml (create the Secrets first: cluster/README.md)")
    return 0


def sim_benchmark_main(argv: list[str] | None = None) -> int:
    """``python -m mtorl.sim.benchmark``: the closed-loop benchmark of a checkpoint trained on simulated logs."""
    from mtorl.sim import benchmark

    ap = argparse.ArgumentParser(prog="python -m mtorl.sim.benchmark", description=benchmark.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True, help="output path without extension (OUT.md, OUT.json)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--imitation-at", type=float, nargs="*", default=[0.3],
                    help="budgets at which the same checkpoint's imitation policy gets a row too")
    ap.add_argument("--ensemble-pessimism", type=float, nargs="*", default=[],
                    help="values of beta_e (decision.ensemble_pessimism): a row at every budget scoring r-hat - beta_e * "
                         "the ensemble members' spread (the checkpoint's own row uses its decision block's)")
    ap.add_argument("--channel-cost-weight", type=float, nargs="*", default=[],
                    help="values of g (decision.channel_cost_weight): a row at every budget choosing the channel by "
                         "r-hat - g*s*cost (with each --ensemble-pessimism value, if any)")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = ap.parse_args(argv)
    md, js = benchmark.write_benchmark(a.checkpoint, a.out, a.budgets, a.seeds, a.users, a.imitation_at,
                                       command="python -m mtorl.sim.benchmark " + " ".join(argv),
                                       ensemble_pessimism=a.ensemble_pessimism,
                                       channel_cost_weight=a.channel_cost_weight)
    print(f"wrote {md} and {js}")
    return 0


def plain_server_main(argv: list[str] | None = None) -> int:
    """``python -m mtorl.serving.plain``: the bench's plain reference server (one uvicorn worker)."""
    from mtorl.serving import plain
    from mtorl.serving.service import is_loopback, token_digest

    ap = argparse.ArgumentParser(prog="python -m mtorl.serving.plain", description=(plain.__doc__ or "").splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    ap.add_argument("--max-body-bytes", type=int, default=4_000_000)
    ap.add_argument("--auth-token-env", help="env var holding the bearer token (required off loopback)")
    a = ap.parse_args(argv)
    digest = None
    if a.auth_token_env:
        import os

        token = os.environ.get(a.auth_token_env)
        if not token:
            ap.error(f"--auth-token-env: environment variable {a.auth_token_env} is not set")
        digest = token_digest(token)
    elif not is_loopback(a.host):
        ap.error(f"--host {a.host}: not a loopback address; set --auth-token-env")
    plain.run_plain_server(a.checkpoint, a.host, a.port, a.max_batch_size, a.batch_wait_timeout_s, a.max_body_bytes,
                           digest)
    return 0


def _known_errors_as_one_line(fn: Callable[[], int]) -> int:
    """``fn()``, with a known error (``MtorlError``) printed as one line and its exit code."""
    from mtorl.errors import MtorlError, one_line

    try:
        return fn()
    except MtorlError as e:
        print(one_line(e), file=sys.stderr)
        return e.exit_code


def local_cluster_main(argv: list[str] | None = None) -> int:
    """Entry of cluster/local/up.sh, down.sh and status.sh: ``up [WORKERS] | down | status``."""
    from mtorl import jobs

    p = argparse.ArgumentParser(prog="cluster/local")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("workers", nargs="?", type=int, default=1)
    p.add_argument("--state-dir", help="where cluster.json and node logs go (default $MTORL_CLUSTER_DIR or ~/.mtorl/cluster)")
    p.add_argument("--cpus-per-node", type=float, default=1)
    p.add_argument("--object-store-mb", type=int, default=256)
    a = p.parse_args(argv)
    try:
        if a.action == "up":
            st = jobs.local_cluster_up(a.workers, a.state_dir, a.cpus_per_node, a.object_store_mb)
            print(f"local Ray cluster up: head + {a.workers} worker(s), {a.cpus_per_node:g} CPU each")
            print(f"dashboard (submit here): {st['dashboard']}\nGCS: {st['gcs']}\nRAY_AUTH_MODE={st['auth_mode']}")
            print(f"state: {jobs.state_file(a.state_dir)}")
            if st["auth_mode"] == "token":
                print("clients need the same mode: export RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token)")
            return 0
        if a.action == "down":
            n = jobs.local_cluster_down(a.state_dir)
            print(f"stopped {n} node(s)" if n else "no local cluster recorded")
            return 0
        found = jobs.local_cluster_status(a.state_dir)
        if found is None:
            print("no local cluster recorded")
            return 1
        st, nodes, alive = found
        print(f"dashboard {st['dashboard']}: {nodes} node(s) alive; processes up: {', '.join(alive) or 'none'}")
        return 0 if alive else 1
    except jobs.ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Top-level handler: a known error (``MtorlError``, also when a Ray task or worker wraps it) is one line
    and exit 2; anything else is one line plus a hint, and exit 1. ``--debug`` (anywhere) or
    ``MTORL_DEBUG=1`` re-raises with the traceback."""
    import os

    from mtorl.errors import MtorlError, find_known, one_line

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MTORL_DEBUG") == "1"
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    from mtorl.console import session

    try:
        with session(verbose=args.verbose):
            return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every failure becomes one line
        if debug:
            raise
        known = find_known(e)
        if isinstance(known, SpecError):
            print(str(known), file=sys.stderr)  # one line per problem, each naming file and field
        elif known is not None:
            print(f"error: {one_line(known)}", file=sys.stderr)
        else:
            print(f"error: {type(e).__name__}: {one_line(e)} (unexpected; rerun with --debug for the traceback)",
                  file=sys.stderr)
        return known.exit_code if isinstance(known, MtorlError) else 1


if __name__ == "__main__":
    sys.exit(main())


def haproxy_main() -> int:
    """The ``mtorl-haproxy`` console script: Ray Serve's HAProxy with its stats/metrics bound to loopback."""
    from mtorl.serving.haproxy_loopback import exec_haproxy

    try:
        exec_haproxy(sys.argv[1:], sys.argv[0])
    except OSError as e:  # FileNotFoundError included
        print(f"mtorl-haproxy: {e}", file=sys.stderr)
    return 1  # only reached when HAProxy could not be started
