"""``make demo``: the main job end to end on embedded defaults.

embedded object store -> data (simulated, or DATA=file) -> prepare -> train (Ray Train, 2 workers)
-> evaluate (report + plots) -> closed loop + OPE vs truth (simulated data only) -> tune (small sweep)
-> serve the best model and query it.
Prints where every result went.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtorl.localhost import free_port
from mtorl.spec import make_job

# Fresh simulated users of the demo's closed loop: with 1000 the 95% intervals of mtorl and the logger
# overlapped although mtorl's mean was 24% higher; the interval half-width shrinks as 1/sqrt(users).
DEMO_LOOP_USERS = 2000
# Training epochs (an epoch of the demo's 3000 simulated users takes seconds; 3 epochs left the reward head
# at val AUC 0.63 and the closed loop within noise of the logger) and, on simulated data, the decision layer
# of ray_jobs/specs/sim-train.yaml (chosen there on the val split: the simulator's logger has full support).
DEMO_EPOCHS = 10
DEMO_PLAIN_LINES = 4  # off a terminal: at most 4 lines per progress display (10 epochs: 3, 6, 9, 10)
SIM_DECISION = {"policy": "reward", "support_threshold": 0.0, "pessimism": 0.0, "budget": 0.3}


def guess_source(path: str) -> str:
    name = Path(path).name.lower()
    if "kuairand" in name:
        return "kuairand-sequence"
    if "criteo_sequence" in name or "criteo-sequence" in name:
        return "criteo-sequence"
    if "criteo" in name:
        return "criteo-attribution"
    return "journeys"


def example_users(dataset_uri: str, n: int = 5, split: str = "test") -> list[dict[str, Any]]:
    """Requests in the served format (names, raw values) from a split's stored journeys."""
    import pyarrow.parquet as pq

    from mtorl import storage
    from mtorl.data.manifest import load_manifest, shard_uris

    man = load_manifest(dataset_uri)
    fs, path = storage.resolve(shard_uris(dataset_uri, man, split)[0])
    rows = pq.read_table(path, filesystem=fs).slice(0, n).to_pylist()
    qn, fn, ch = man.step_features, man.user_features, man.channels
    users = []
    for r in rows:
        T = r["length"]
        steps = [{"channel": ch[r["channel"][t]], "gain": r["gain"][t], "cost": r["cost"][t],
                  "features": dict(zip(qn, r["features"][t * len(qn):(t + 1) * len(qn)]))} for t in range(T)]
        users.append({"user_id": r["user_id"], "journey": steps, "user_features": dict(zip(fn, r["user_features"]))})
    return users


def demo_queries(url: str, dataset_uri: str, progress: Any = print, n: int = 5) -> dict[str, Any]:
    """POST /v1/recommend and /v1/allocate with a few held-out users; print the answers."""
    import httpx

    users = example_users(dataset_uri, n=n)
    rec = httpx.post(f"{url}/v1/recommend", json={"users": users}, timeout=30)
    rec.raise_for_status()
    progress("  recommend: " + ", ".join(f"{u['user_id']} -> {u['recommended_channel']} ({u['expected_reward']:.3f})"
                                         for u in rec.json()["users"]))
    budget = 2.5 * sum(u["journey"][-1]["cost"] for u in users) / len(users)
    alloc = httpx.post(f"{url}/v1/allocate", json={"users": users, "budget": budget}, timeout=30)
    alloc.raise_for_status()
    a = alloc.json()
    progress(f"  allocate budget {budget:.2f}: {len(a['selected'])} users selected, spend {a['spend']:.2f}, "
             f"total expected reward {a['total_expected_reward']:.3f}")
    model = httpx.get(f"{url}/v1/model", timeout=30).json()
    return {"recommend": rec.json(), "allocate": a, "model_version": model.get("version")}


@dataclass(frozen=True)
class DemoOptions:
    """The demo's flags (``python -m mtorl.demo --help``)."""

    dir: str = "demo-output"
    data: str | None = None
    source: str | None = None
    epochs: int = DEMO_EPOCHS
    trials: int = 2
    keep_store: bool = False
    verbose: bool = False


def run_demo(opts: DemoOptions) -> None:
    from mtorl.console import session

    with session(verbose=opts.verbose) as con:
        con.plain_lines = DEMO_PLAIN_LINES
        _demo(opts, con)


def _demo(args: DemoOptions, con: Any) -> None:
    from mtorl.storage import seaweed

    base = Path(args.dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    t0 = time.time()
    try:
        state = seaweed.up(base / "store", None)
    except seaweed.PortInUseError:  # e.g. `mtorl store up` holds 8333: the demo's own store goes elsewhere
        port = seaweed.free_ports(1)[0]
        con(f"the default S3 port {seaweed.DEFAULT_PORT} is taken (another store?); the demo's own store uses port {port}")
        state = seaweed.up(base / "store", port)
    os.environ.update(seaweed.env_vars(state))
    con(f"object store (SeaweedFS) at {state.endpoint}; credentials in {base / 'store' / 'state.json'} (mode 0600)")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", str(base))
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        _run(args, base, results, t0, con)
    finally:
        if not args.keep_store:
            seaweed.down(base / "store")
            con(f"object store stopped (its data stays in {base / 'store'})")


def _detail(con: Any) -> Any:
    """Where a stage's detailed lines go: the console with -v, else the log file beside Ray's
    (the demo prints each stage's result in one line of its own)."""
    if con.verbose:
        return con

    def to_log(msg: str) -> None:
        print(msg, flush=True)  # stdout is the session's log file once Ray is up

    return to_log


def _run(args: DemoOptions, base: Path, results: dict[str, Any], t0: float, con: Any) -> None:
    from mtorl.data.prepare import prepare
    from mtorl.raycluster import init_ray

    bucket = "s3://mtorl-demo"
    if args.data:
        source = args.source or guess_source(args.data)
        raw = args.data
        tag = Path(args.data).name.split(".")[0].split("_")[0]
    else:
        with con.stage("simulated advertising logs (known ground truth)"):
            from mtorl.sim.generate import simulate

            sim_job = make_job("SimulateJob", "demo-sim", {"output": f"{bucket}/raw/sim", "users": 3000, "seed": 0})
            results["simulate"] = simulate(sim_job.spec, progress=con)
        source, raw, tag = "journeys", f"{bucket}/raw/sim", "sim"

    with con.stage(f"prepare ({source})"):
        prep_spec: dict[str, Any] = {"source": source, "input": raw, "output": f"{bucket}/datasets/{tag}"}
        if source == "journeys" and not args.data:
            from mtorl.sim.generate import journeys_format

            prep_spec["journeys"] = journeys_format(f"{bucket}/raw/sim")
        manifest = prepare(make_job("PrepareJob", "demo-prepare", prep_spec).spec, progress=con)
        results["prepare"] = {"dataset": prep_spec["output"], "rows_read": manifest.rows_read, "rows_dropped": manifest.rows_dropped,
                              "users": {k: v.users for k, v in manifest.splits.items()}}

    with con.stage("start Ray (local, loopback)"):
        init_ray()
    with con.stage("train (Ray Train, 2 data-parallel workers, checkpoints in the object store)"):
        from mtorl.training.driver import run_train

        train_job = make_job("TrainJob", f"demo-{tag}", {
            "data": prep_spec["output"], "output": f"{bucket}/runs",
            "model": {"name": "mtorl", "hidden": 32, "tcn": {"levels": 2}, "attention": {"heads": 2}, "decoder_hidden": 32},
            "trainer": {"workers": 2, "cpus_per_worker": 1, "epochs": args.epochs, "batch_size": 64,
                        # select the checkpoint on the value of its decisions (the decision layer at 30% budget)
                        "metric": "val/select_rate@budget", "mode": "max"},
            "tracking": {"wandb": os.environ.get("WANDB_MODE", "offline")},
            **({} if args.data else {"decision": SIM_DECISION}),
        })
        results["train"] = run_train(train_job, progress=con)

    with con.stage("evaluate on the user-disjoint test split (heuristics in the table)"):
        from mtorl.evaluation.run import run_evaluate

        ev = make_job("EvaluateJob", "demo-eval", {"checkpoint": results["train"]["best_checkpoint"],
                                                   "output": str(base / "report"), "bootstrap": 50})
        results["evaluate"] = run_evaluate(ev.spec, progress=_detail(con))
        cmp = results["evaluate"]["compare"]
        for k in sorted(cmp, key=lambda k: k != "mtorl"):
            r = cmp[k]
            con(f"  {k:<10} acc {r['channel_accuracy']:.3f}  macro-F1 {r['macro_f1']:.3f}  reward AUC {_num(r['reward_auc'])}")

    if not args.data:
        with con.stage("closed loop in the simulator (true reward under a budget) and OPE against the truth"):
            from mtorl.sim.closed_loop import run_online_evaluation

            on = make_job("EvaluateJob", "demo-online", {"checkpoint": results["train"]["best_checkpoint"],
                                                         "output": str(base / "online"), "bootstrap": 50})
            results["online"] = run_online_evaluation(on.spec, users=DEMO_LOOP_USERS, budget=0.3, progress=_detail(con))
            rows = results["online"]["results"]
            con("  true reward at 30% budget [95% CI]: " + ", ".join(
                f"{k} {v['expected_reward']['value']:.0f} [{v['expected_reward']['ci95'][0]:.0f}, {v['expected_reward']['ci95'][1]:.0f}]"
                for k, v in rows.items()))

    with con.stage(f"tune ({args.trials} trials over μ and λ, ASHA; each trial trains in its own process)"):
        from mtorl.tuning.sweep import run_tune

        tune_job = make_job("TuneJob", f"demo-{tag}-sweep", {
            "base": {**train_job.spec.model_dump(mode="json", by_alias=True),
                     "trainer": {"workers": 0, "epochs": 2, "batch_size": 64}},  # trials run the loop in process
            "parameters": {"objective.reward_weight": {"type": "double", "min": 0.3, "max": 3.0, "log": True},
                           "objective.pref_weight": {"type": "double", "min": 0.0, "max": 0.5}},
            "algorithm": "random", "early_stopping": "asha", "max_trials": args.trials, "output": f"{bucket}/sweeps",
        })
        results["tune"] = run_tune(tune_job, progress=_detail(con))
        best_t = results["tune"].get("best")
        if best_t:
            con(f"  best trial {best_t['trial']}: {results['tune']['metric']} {best_t['metric']:.4f} with "
                + ", ".join(f"{k} {v:.3g}" for k, v in best_t["config"].items()))

    with con.stage("serve the best model (Ray Serve on 127.0.0.1) and query it"):
        from mtorl.serving.app import run_serve

        best = (results["tune"].get("best") or {}).get("checkpoint") or results["train"]["best_checkpoint"]
        serve_job = make_job("ServeJob", "demo-serve", {"checkpoint": best, "port": free_port()})
        t_serve = time.time()
        served = run_serve(serve_job, address=None, config_out=str(base / "serve_config.yaml"), blocking=False,
                           progress=_detail(con))
        con(f"  ready at {served['url']} in {time.time() - t_serve:.1f} s (API docs {served['docs']})")
        try:
            results["serve"] = {**served, "queries": demo_queries(served["url"], prep_spec["output"], progress=con, n=3)}
        finally:
            from ray import serve

            serve.shutdown()

    (base / "results.json").write_text(json.dumps(results, indent=2, default=str))
    con(f"== done in {time.time() - t0:.0f} s; where everything went:")
    for label, where in (
        ("object store", f"{os.environ.get('AWS_ENDPOINT_URL_S3')} (data dir {base / 'store'})"),
        ("dataset", f"{prep_spec['output']} (manifest.json)"),
        ("training run", results["train"]["run_uri"]),
        ("best checkpoint", results["train"]["best_checkpoint"]),
        ("evaluation report", f"{base / 'report' / 'report.html'} (one page; also report.md, metrics.json, PNG plots)"),
        *([("closed loop + OPE", str(base / "online" / "online.md"))] if "online" in results else []),
        ("sweep leaderboard", f"{results['tune']['sweep_uri']}/leaderboard.md"),
        ("serve config", str(base / "serve_config.yaml")),
        ("all results", str(base / "results.json")),
        ("W&B (offline)", f"{base / 'wandb'} (wandb sync to upload)"),
        ("Ray logs", con.ray_logs or "-"),
    ):
        con(f"  {label:<18} {where}")


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    from mtorl.cli import demo_main

    raise SystemExit(demo_main())
