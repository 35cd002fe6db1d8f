"""Benchmarks: every stage measures our path and its plain reference in the same run and reports the ratio.

``python -m mtorl.bench [--quick] [--stages prepare,stream,train,serve,scale] [--device cpu|cuda] [--out DIR]``
(also ``make bench BENCH_ARGS=...`` and ``mtorl bench ...``). Writes ``DIR/results.json``
(``results-cuda.json`` for ``--device cuda``) and regenerates the table section of ``BENCHMARKS.md``
between its markers (the prose around it is kept).

Stages (ratio = ours / plain reference, same machine, same data, same run):

- ``prepare``: rows/s of ``prepare`` (CSV logs -> split, normalised dataset in object storage) vs pyarrow
  alone reading the same CSV and writing one Parquet file to the same store.
- ``stream``: windows/s that Ray Data (``window_dataset(...).iter_batches``) delivers from object storage
  vs the rate a plain ``train_batches`` loop consumes in-memory windows (> 1: training is never input-bound).
- ``train``: samples/s of 1- and 2-worker Ray Train runs (``run_train``) vs the plain single-process loop
  over the same windows in memory, and the fraction of step time spent waiting for input.
  Also the whole-job wall time (start-up included) of the 1-worker run and of the same job in process
  (``trainer.workers: 0``, CPU) vs the plain whole job (read the windows, build, train + val).
- ``serve``: p50/p99 latency and requests/s at concurrency 1, 8, 32 over HTTP (one journey of length 20
  per request) of each Ray Serve ingress mode vs the plain reference server (the same request code on one
  uvicorn worker, ``mtorl.serving.plain``), and journeys/s of requests carrying 8 and 32 users vs the raw
  ``Predictor`` forward at the same batch size.
- ``scale``: peak memory and wall time of ``prepare``, of one 2-worker training epoch (streaming forced) and of
  one evaluation (streaming forced; the default ``exact_max_steps``) at two sizes, each in its own
  subprocess (its own Ray); peak memory is the subprocess's VmHWM and, for the epoch and the evaluation, the
  sampled peak of the summed RSS of its whole process tree (Ray's raylet, workers and object store included).

The bench starts its own embedded object store (in a temp dir, on free ports) and its own local Ray, and
stops both at the end (the store by PID). Nothing here runs at import time.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from mtorl.errors import MtorlError
from mtorl.raycluster import LOCAL_DEFAULTS

if TYPE_CHECKING:
    from mtorl.data.manifest import Manifest

STAGES = ("prepare", "stream", "train", "serve", "scale")
BUCKET = "s3://mtorl-bench"
MEAN_STEPS = 20.0
WINDOW = 20
BATCH = 64
GPU_BATCH = 1024  # --device cuda: a batch that keeps the GPU busy (64 windows leave it mostly idle)
# The demo's model: what a user of `make demo` trains.
MODEL: dict[str, Any] = {"name": "mtorl", "hidden": 32, "tcn": {"levels": 2}, "attention": {"heads": 2}, "decoder_hidden": 32}
SERVE_LENGTH = 20
SERVE_BATCH = 32
CONCURRENCY = (1, 8, 32)
SERVE_MODES = ("proxy", "direct", "haproxy")  # ServeSpec.ingress values, each against the plain server
USERS_PER_REQUEST = (1, 8, 32)   # request sizes (users per request) measured at SIZE_CONCURRENCY
SIZE_CONCURRENCY = 8
MARK_START = "<!-- bench:{device}:start -->"
MARK_END = "<!-- bench:{device}:end -->"
BENCH_ENV = {  # the local-Ray defaults of mtorl.raycluster, plus no auth and no W&B for a throwaway cluster
    **LOCAL_DEFAULTS,
    "RAY_AUTH_MODE": "disabled",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
}
TARGETS = {
    "stream": "stream/train > 1",
    "train": "1-worker ratio >= 0.8; input wait <= 10%",
    "serve": ">= 0.8x plain req/s at c=8 and c=32; p99 at c=8 <= 50 ms (CPU); 32-user requests >= 50% of raw journeys/s",
    "scale": "peak memory at the large size <= 1.5x the small",
}


@dataclass(frozen=True)
class Sizes:
    """Workload sizes of one mode."""

    steps: int                  # simulated steps of the main dataset
    epochs: int                 # Ray Train epochs per run
    requests: int               # HTTP requests per concurrency level
    raw_repeats: int            # Predictor forward passes timed
    scale: tuple[int, int]      # simulated steps of the two scale points (small, large)
    scale_epoch: bool = True    # also time one training epoch at both scale points
    scale_eval: bool = True     # also time one evaluation at both scale points


QUICK = Sizes(steps=60_000, epochs=3, requests=160, raw_repeats=30, scale=(100_000, 1_000_000), scale_epoch=False)
FULL = Sizes(steps=400_000, epochs=2, requests=1_000, raw_repeats=200, scale=(1_000_000, 10_000_000))


# ----------------------------------------------------------------------------- small helpers

def _rate(n: float, seconds: float) -> float:
    return float(n) / max(seconds, 1e-9)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return round(a / b, 3)


def _vmhwm_mb() -> float:
    """Peak resident memory of this process (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _tree_rss_mb(root: int) -> float:
    """Summed RSS of ``root`` and all its descendants, MiB (shared pages count once per process)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            parents[int(d)] = int(fields[1])
            rss[int(d)] = int(Path(f"/proc/{d}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    keep, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for c in children.get(frontier.pop(), []):
            if c not in keep:
                keep.add(c)
                frontier.append(c)
    return sum(rss.get(p, 0) for p in keep) / (1 << 20)


class _Sampler:
    """Calls ``sample()`` every ``period_s`` in a thread between ``__enter__`` and ``__exit__``."""

    sample_at_exit = False

    def __init__(self, period_s: float = 0.5) -> None:
        self.period = period_s
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def __enter__(self) -> Any:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        if self.sample_at_exit:
            self.sample()


class TreePeak(_Sampler):
    """Samples the summed RSS of this process tree in a thread; ``peak_mb`` after ``stop``."""

    sample_at_exit = True

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(period_s)
        self.peak_mb = 0.0

    def sample(self) -> None:
        self.peak_mb = max(self.peak_mb, _tree_rss_mb(os.getpid()))


class GpuUtil(_Sampler):
    """Samples GPU utilisation (%) and memory in use (MiB) of device 0 in a thread, from ``nvidia-smi``
    (it sees every process, Ray's workers included), else ``torch.cuda.utilization`` (needs pynvml)."""

    def __init__(self, period_s: float = 0.5) -> None:
        super().__init__(period_s)
        self.util: list[float] = []
        self.mem_mb: list[float] = []
        self.source: str | None = None

    def _query(self) -> tuple[float, float] | None:
        import shutil

        if shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                      "--id=0"], capture_output=True, text=True, timeout=5).stdout.strip()
                u, m = (float(x) for x in out.splitlines()[0].split(","))
                self.source = "nvidia-smi"
                return u, m
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
        try:
            import torch

            self.source = "torch.cuda.utilization"
            return float(torch.cuda.utilization(0)), float(torch.cuda.memory_usage(0))
        except Exception:  # noqa: BLE001 - no pynvml: no utilisation figure
            return None

    def sample(self) -> None:
        got = self._query()
        if got is not None:
            self.util.append(got[0])
            self.mem_mb.append(got[1])

    def summary(self) -> dict[str, Any]:
        if not self.util:
            return {"gpu_util_pct": None, "note": "no utilisation source (nvidia-smi or pynvml)"}
        busy = [u for u in self.util if u > 0] or [0.0]
        return {"gpu_util_mean_pct": round(float(np.mean(self.util)), 1), "gpu_util_busy_mean_pct": round(float(np.mean(busy)), 1),
                "gpu_util_max_pct": round(max(self.util), 1), "gpu_mem_max_mb": round(max(self.mem_mb), 1),
                "samples": len(self.util), "source": self.source}


def machine_facts(device: str) -> dict[str, Any]:
    import pyarrow
    import ray
    import torch

    import mtorl

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
        "pyarrow": pyarrow.__version__, "mtorl": mtorl.__version__, "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        facts["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    except (ValueError, OSError):
        pass
    if device == "cuda" and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["gpus"] = torch.cuda.device_count()
        facts["cuda"] = torch.version.cuda
        facts["bf16"] = bool(torch.cuda.is_bf16_supported())
    return facts


# ----------------------------------------------------------------------------- data

def simulate_csv(steps: int, work: Path, say: Callable[[str], Any]) -> tuple[Path, dict[str, Any], int]:
    """Simulate about ``steps`` steps and stream them into one CSV (the journeys format, no ground truth).

    Returns (csv path, the ``journeys`` column mapping, rows written)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from mtorl.sim.generate import simulate
    from mtorl.spec import make_job

    sim_dir = work / f"sim-{steps}"
    users = max(10, int(round(steps / MEAN_STEPS)))
    spec = make_job("SimulateJob", "bench-sim", {"output": str(sim_dir), "users": users, "mean_steps": MEAN_STEPS,
                                                 "seed": 0, "write_truth": False, "shard_steps": 500_000}).spec
    meta = simulate(spec, progress=None)
    fmt = dict(meta["journeys"])
    cols = [fmt[k] for k in ("user_col", "time_col", "channel_col", "gain_col", "cost_col", "propensity_col")]
    cols += list(fmt["numeric_features"]) + list(fmt["user_features"])
    path = work / f"journeys-{steps}.csv"
    rows, writer = 0, None
    try:
        for shard in meta["shards"]:
            tab = pq.read_table(sim_dir / shard["path"], columns=cols)
            if writer is None:
                writer = pacsv.CSVWriter(str(path), _plain_schema(tab.schema))
            writer.write_table(tab.cast(_plain_schema(tab.schema)))
            rows += tab.num_rows
    finally:
        if writer is not None:
            writer.close()
    for shard in meta["shards"]:
        (sim_dir / shard["path"]).unlink(missing_ok=True)
    say(f"bench: simulated {rows:,} steps of {users:,} users -> {path.name} ({path.stat().st_size / 1e6:.0f} MB)")
    return path, fmt, rows


def _plain_schema(schema: Any) -> Any:
    import pyarrow as pa

    return pa.schema([pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for f in schema])


def load_windows(uri: str, split: str) -> tuple[dict[str, np.ndarray], Manifest]:
    """All windows of one split in memory (read with pyarrow, cut with the same numpy code as Ray Data)."""
    import pyarrow.parquet as pq

    from mtorl import storage
    from mtorl.data.manifest import load_manifest, shard_uris
    from mtorl.data.windows import journeys_from_table, make_windows

    m = load_manifest(uri)
    D = m.state_dim
    parts = []
    for u in shard_uris(uri, m, split):
        fs, path = storage.resolve(u)
        parts.append(make_windows(journeys_from_table(pq.read_table(path, filesystem=fs), m), WINDOW, state_dim=D))
    if not parts:
        return make_windows([], WINDOW, state_dim=D), m
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, m


def batch_size(device: str) -> int:
    return GPU_BATCH if device == "cuda" else BATCH


def _batches(windows: dict[str, np.ndarray], bs: int) -> Iterator[dict[str, np.ndarray]]:
    n = len(windows["mask"])
    for s in range(0, n - bs + 1, bs):  # full batches only: same shapes as the streamed path
        yield {k: v[s:s + bs] for k, v in windows.items()}


def _model_and_opt(manifest: Manifest, device: Any) -> tuple[Any, Any, bool]:
    import torch

    from mtorl.models import build_model
    from mtorl.spec import ModelSpec

    binary = manifest.gain_binary
    torch.manual_seed(0)
    model = build_model(ModelSpec.model_validate(MODEL), state_dim=manifest.state_dim,
                        n_channels=manifest.n_channels, binary=binary).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), binary


def plain_train_rate(windows: dict[str, np.ndarray], manifest: Manifest, device: str, threads: int | None,
                     min_seconds: float = 3.0, compile: bool = False) -> dict[str, Any]:
    """Windows/s of the plain PyTorch loop (``train_batches``) over in-memory windows (``compile``: the
    model under ``torch.compile``, its compilation timed apart as ``warmup_s``)."""
    import torch

    from mtorl.spec import ObjectiveSpec
    from mtorl.training.step import maybe_compile, train_batches

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        model, opt, binary = _model_and_opt(manifest, dev)
        maybe_compile(model, compile)
        obj = ObjectiveSpec()
        batches = list(_batches(windows, batch_size(device)))
        if not batches:
            raise RuntimeError("no full training batch in the dataset; use more --steps")
        t_warm = time.perf_counter()
        train_batches(model, opt, batches[:3], obj, binary, dev, 1.0)  # warm-up (and compilation)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t_warm
        n, t0 = 0, time.perf_counter()
        while True:  # whole passes until min_seconds
            stats = train_batches(model, opt, batches, obj, binary, dev, 1.0)
            n += stats.windows
            if time.perf_counter() - t0 >= min_seconds:
                break
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        return {"windows_per_s": round(_rate(n, sec), 1), "windows": n, "seconds": round(sec, 2),
                "warmup_s": round(warmup_s, 2), "torch_threads": torch.get_num_threads(), "compiled": compile}
    finally:
        torch.set_num_threads(saved)


def plain_job_wall(uri: str, manifest: Manifest, device: str, epochs: int, threads: int | None) -> dict[str, Any]:
    """Wall time of the whole plain job, start-up included: read the train and val windows from object
    storage, build the model, then ``epochs`` x (train pass + validation pass). What a 1-worker Ray Train
    run does, without Ray."""
    import torch

    from mtorl.spec import ObjectiveSpec
    from mtorl.training.step import train_batches, validate_batches

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        train, _ = load_windows(uri, "train")
        val, _ = load_windows(uri, "val")
        dev = torch.device(device)
        model, opt, binary = _model_and_opt(manifest, dev)
        obj, bs = ObjectiveSpec(), batch_size(device)
        t_read = time.perf_counter() - t0
        for _ in range(epochs):
            train_batches(model, opt, _batches(train, bs), obj, binary, dev, 1.0)
            validate_batches(model, _batches(val, 2 * bs), obj, binary, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return {"wall_s": round(time.perf_counter() - t0, 2), "read_s": round(t_read, 2), "epochs": epochs}
    finally:
        torch.set_num_threads(saved)


# ----------------------------------------------------------------------------- the run

class Bench:
    def __init__(self, sizes: Sizes, device: str, work: Path, say: Callable[[str], Any]) -> None:
        self.sizes, self.device, self.work, self.say = sizes, device, work, say
        self.csv: Path | None = None
        self.fmt: dict[str, Any] = {}
        self.rows = 0
        self.dataset: str | None = None
        self.checkpoint: str | None = None
        self._plain: dict[str, Any] | None = None
        self._windows: tuple[dict[str, np.ndarray], Manifest] | None = None
        self.repeats = 2
        self.compile = False
        self.serve_modes: tuple[str, ...] = SERVE_MODES  # the Serve ingress modes the serve stage measures
        self.workers: tuple[int, ...] = (1, 2)           # the Ray Train worker counts of the train stage

    # -- shared inputs, made on first use
    def data(self) -> str:
        """The main prepared dataset URI (simulated CSV -> prepare)."""
        if self.dataset is None:
            self._csv()
            self.dataset = f"{BUCKET}/datasets/main"
            self._prepare(self.dataset)
        return self.dataset

    def _csv(self) -> Path:
        if self.csv is None:
            self.csv, self.fmt, self.rows = simulate_csv(self.sizes.steps, self.work, self.say)
        return self.csv

    def _prepare(self, out: str) -> Manifest:
        from mtorl.data.prepare import prepare
        from mtorl.spec import make_job

        spec = make_job("PrepareJob", "bench-prepare", {"source": "journeys", "input": str(self._csv()), "output": out,
                                                         "journeys": self.fmt}).spec
        return prepare(spec, progress=lambda _m: None)

    def windows(self) -> tuple[dict[str, np.ndarray], Manifest]:
        if self._windows is None:
            self._windows = load_windows(self.data(), "train")
        return self._windows

    def plain(self) -> dict[str, Any]:
        """The plain single-process loop, at one worker's CPU share (1 thread) on CPU."""
        if self._plain is None:
            w, m = self.windows()
            self._plain = plain_train_rate(w, m, self.device, threads=1 if self.device == "cpu" else None)
            self.say(f"bench: plain PyTorch loop {self._plain['windows_per_s']:,.0f} windows/s")
        return self._plain

    def ray(self) -> None:
        import ray

        if not ray.is_initialized():
            from mtorl.raycluster import init_ray

            init_ray()

    # -- stages
    def stage_prepare(self) -> dict[str, Any]:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        from mtorl import storage

        csv = self._csv()
        csv.read_bytes()  # same page cache for both readers
        base_uri = f"{BUCKET}/baseline/journeys.parquet"
        storage.ensure_bucket(base_uri)
        fs, path = storage.resolve(base_uri)
        pq.write_table(pacsv.read_csv(str(csv), read_options=pacsv.ReadOptions(block_size=1 << 16)).slice(0, 10),
                       path, filesystem=fs)  # warm-up: the S3 client's first connection
        base_s = ours_s = math.inf
        m: Manifest | None = None
        self.dataset = f"{BUCKET}/datasets/main"
        for _ in range(self.repeats):  # best of: the same data, alternating
            t0 = time.perf_counter()
            pq.write_table(pacsv.read_csv(str(csv)), path, filesystem=fs)
            base_s = min(base_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            m = self._prepare(self.dataset)
            ours_s = min(ours_s, time.perf_counter() - t0)
        assert m is not None  # repeats >= 1
        ours, base = _rate(m.rows_read, ours_s), _rate(self.rows, base_s)
        return {"rows": self.rows, "ours": {"rows_per_s": round(ours), "seconds": round(ours_s, 2)},
                "baseline": {"name": "pyarrow read_csv + write_parquet", "rows_per_s": round(base), "seconds": round(base_s, 2)},
                "ratio": _ratio(ours, base), "users": sum(s.users for s in m.splits.values()),
                "note": f"best of {self.repeats} alternating runs; prepare also groups, splits, normalises and writes a manifest"}

    def stage_stream(self) -> dict[str, Any]:
        from mtorl.data.pipeline import window_dataset
        from mtorl.spec import WindowSpec

        uri = self.data()
        plain = self.plain()
        self.ray()
        passes = []
        for _ in range(2):  # the first pass also pays for planning and worker start-up
            ds = window_dataset(uri, "train", WindowSpec(length=WINDOW))
            n, n_first, first, t0 = 0, 0, None, time.perf_counter()
            for b in ds.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=2):
                if first is None:
                    first, n_first = time.perf_counter(), len(b["mask"])
                n += len(b["mask"])
            t1 = time.perf_counter()
            passes.append({"windows": n, "seconds": round(t1 - t0, 2), "windows_per_s": round(_rate(n, t1 - t0), 1),
                           "first_batch_s": round((first or t1) - t0, 2),
                           "after_first_windows_per_s": round(_rate(n - n_first, t1 - (first or t1)), 1)})
        ours = passes[-1]["windows_per_s"]
        return {"ours": {"windows_per_s": ours, "passes": passes, "source": "window_dataset(...).iter_batches from the object store",
                         "note": "whole second pass, start-up (time to first batch) included"},
                "baseline": {"name": "plain train_batches over in-memory windows", **plain},
                "ratio": _ratio(ours, plain["windows_per_s"]), "target": TARGETS["stream"],
                "met": bool(ours > plain["windows_per_s"])}

    def _train_job(self, name: str, workers: int, epochs: int, max_steps: int | None = None) -> Any:
        from mtorl.spec import make_job

        # One rank per GPU (NCCL rejects two ranks on one device): a GPU worker takes a whole GPU.
        trainer: dict[str, Any] = {"workers": workers, "cpus_per_worker": 1, "epochs": epochs,
                                   "batch_size": batch_size(self.device), "use_gpu": self.device == "cuda",
                                   "gpus_per_worker": 1.0, "max_steps_per_epoch": max_steps}
        return make_job("TrainJob", name, {"data": self.data(), "output": f"{BUCKET}/runs", "window": {"length": WINDOW},
                                           "model": MODEL, "trainer": trainer, "tracking": {"wandb": "disabled"}})

    def train_workers(self) -> tuple[int, ...]:
        """Worker counts of the train stage (``--train-workers``, default 1 and 2); on CUDA 2 only with 2 GPUs
        (one rank per GPU)."""
        if self.device != "cuda":
            return self.workers
        import torch

        return tuple(w for w in self.workers if w == 1 or torch.cuda.device_count() >= w)

    def stage_train(self) -> dict[str, Any]:
        from mtorl.training.driver import run_train

        gpu = self.device == "cuda"
        if gpu:
            with GpuUtil() as util_plain:
                plain = dict(self.plain())
            plain.update(util_plain.summary())
        else:
            plain = self.plain()
        self.ray()
        tag = f"{int(time.time()) % 100000}"
        runs: dict[str, Any] = {}
        for workers in self.train_workers():
            with GpuUtil() if gpu else nullcontext() as util:
                res = run_train(self._train_job(f"bench-{workers}w-{tag}", workers, self.sizes.epochs), progress=self.say)
            sps = res.get("samples_per_s")
            wait = (res.get("final_metrics") or {}).get("train/input_wait_frac")
            runs[f"{workers}w"] = {"samples_per_s": round(float(sps), 1) if sps is not None else None,
                                   "input_wait_frac": round(float(wait), 4) if wait is not None else None,
                                   "wall_s": res.get("wall_s"), "ratio": _ratio(sps, plain["windows_per_s"]),
                                   "per_epoch": _epoch_history(res.get("latest_checkpoint")),
                                   **(util.summary() if util is not None else {})}
            if workers == 1:
                self.checkpoint = res["best_checkpoint"]
        r1, w1 = runs["1w"]["ratio"], runs["1w"]["input_wait_frac"]
        w, m = self.windows()
        if self.compile:  # the plain loop again under torch.compile (trainer.compile), compilation timed apart
            comp = plain_train_rate(w, m, self.device, threads=1 if not gpu else None, compile=True)
            plain = {**plain, "compiled": comp, "compiled_ratio": _ratio(comp["windows_per_s"], plain["windows_per_s"])}
        job_wall = plain_job_wall(self.data(), m, self.device, self.sizes.epochs, threads=1 if not gpu else None)
        runs["1w"]["wall_ratio"] = _ratio(runs["1w"]["wall_s"], job_wall["wall_s"])
        plain = {**plain, "job": job_wall}
        inprocess = None if gpu else self.inprocess_job(tag, job_wall["wall_s"])
        out = {"ours": runs, "baseline": {"name": "plain single-process train_batches, windows in memory", **plain},
               "ratio": r1, "ratio_2w": runs["2w"]["ratio"] if "2w" in runs else None, "target": TARGETS["train"],
               "batch_size": batch_size(self.device), **({"inprocess": inprocess} if inprocess else {}),
               "met": bool(r1 is not None and r1 >= 0.8 and w1 is not None and w1 <= 0.10),
               "note": "samples/s of the last epoch (Ray Train's own metric: windows / per-worker epoch time, summed over "
                       "workers); " + ("the plain loop runs on the same GPU with the same model, batch and windows "
                                       "(in memory); 1 GPU per worker, 2 workers only with 2 GPUs" if gpu else
                                       "the plain loop runs 1 torch thread, the CPU share of one worker")}
        return out

    def inprocess_job(self, tag: str, plain_wall_s: float) -> dict[str, Any]:
        """Wall time of the same job in process (``trainer.workers: 0``: the loop in the driver, no Ray Train
        controller or worker processes), at 1 torch thread like the plain job; CPU only."""
        import torch

        from mtorl.training.driver import run_train

        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            res = run_train(self._train_job(f"bench-0w-{tag}", 0, self.sizes.epochs), progress=self.say)
        finally:
            torch.set_num_threads(saved)
        return {"wall_s": res.get("wall_s"), "wall_ratio": _ratio(res.get("wall_s"), plain_wall_s)}

    def _ensure_checkpoint(self) -> str:
        if self.checkpoint is None:
            from mtorl.training.driver import run_train

            self.ray()
            res = run_train(self._train_job(f"bench-serve-{int(time.time()) % 100000}", 0, 1, max_steps=30), progress=self.say)
            self.checkpoint = res["best_checkpoint"]
        return self.checkpoint

    def stage_serve(self) -> dict[str, Any]:
        import torch

        from mtorl.serving.predictor import Predictor
        from mtorl.spec import make_job
        from mtorl.storage.seaweed import free_ports

        ck = self._ensure_checkpoint()
        bodies = serve_bodies(self._csv(), self.fmt, SERVE_LENGTH, 64)
        sized = {n: merge_bodies(bodies, n) for n in USERS_PER_REQUEST if n > 1}
        # raw: the Predictor alone on journeys of the same length, at each batch size, 1 torch thread (a
        # replica's share)
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        pred = Predictor.from_checkpoint(ck, device=self.device)
        journeys = [j for j in _test_journeys(self.data(), SERVE_LENGTH)][:SERVE_BATCH]
        raw: dict[str, Any] = {}
        for bs in sorted({1, SERVE_BATCH, *USERS_PER_REQUEST}):
            chunk = (journeys * SERVE_BATCH)[:bs]
            pred.predict_next(chunk)
            t0 = time.perf_counter()
            for _ in range(self.sizes.raw_repeats):
                pred.predict_next(chunk)
            if self.device == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            raw[f"batch_{bs}"] = {"journeys_per_s": round(_rate(bs * self.sizes.raw_repeats, sec), 1),
                                  "ms_per_call": round(1000 * sec / self.sizes.raw_repeats, 2)}
        del pred
        torch.set_num_threads(saved)

        def levels(url: str) -> dict[str, Any]:
            out = {f"c{c}": http_load(url, bodies, c, self.sizes.requests if c > 1 else max(50, self.sizes.requests // 2))
                   for c in CONCURRENCY}
            for n, bs in sized.items():  # many users per request, at the headline concurrency
                r = http_load(url, bs, SIZE_CONCURRENCY, max(40, self.sizes.requests // 2))
                out[f"users_{n}"] = {**r, "users_per_request": n,
                                     "journeys_per_s": round(r["requests_per_s"] * n, 1),
                                     "vs_raw": _ratio(r["requests_per_s"] * n, raw[f"batch_{n}"]["journeys_per_s"])}
            return out

        modes: dict[str, Any] = {}
        port = free_ports(1)[0]
        with plain_server(ck, port, self.work / "plain.log") as url:
            modes["plain"] = levels(url + RECOMMEND_PATH)
        self.say(f"bench: plain uvicorn c8 {modes['plain']['c8']['requests_per_s']} req/s")

        from ray import serve

        from mtorl.serving.app import run_serve

        self.ray()
        for ingress in self.serve_modes:
            port = free_ports(1)[0]
            job = make_job("ServeJob", f"bench-serve-{ingress}", {"checkpoint": ck, "port": port, "ingress": ingress,
                                                                 "max_batch_size": SERVE_BATCH, "max_ongoing_requests": 64})
            served = run_serve(job, address=None, config_out=str(self.work / f"serve_config_{ingress}.yaml"),
                               blocking=False, progress=self.say)
            try:
                modes[ingress] = levels(str(served["url"]).rstrip("/") + RECOMMEND_PATH)
            finally:
                serve.shutdown()
            self.say(f"bench: serve {ingress} c8 {modes[ingress]['c8']['requests_per_s']} req/s")

        plain = modes["plain"]
        vs_plain = {m: {k: {"requests_per_s": _ratio(v["requests_per_s"], plain[k]["requests_per_s"]),
                            "p50": _ratio(v["p50_ms"], plain[k]["p50_ms"]), "p99": _ratio(v["p99_ms"], plain[k]["p99_ms"])}
                        for k, v in modes[m].items()} for m in self.serve_modes}
        top = f"users_{max(USERS_PER_REQUEST)}"

        def met(m: str) -> bool:
            r = vs_plain[m]
            return bool(all((r[k]["requests_per_s"] or 0) >= 0.8 for k in ("c8", "c32"))
                        and (self.device != "cpu" or modes[m]["c8"]["p99_ms"] <= 50.0)
                        and (modes[m][top]["vs_raw"] or 0) >= 0.5)

        head = "proxy" if "proxy" in self.serve_modes else self.serve_modes[0]
        other = {m: modes[m] for m in self.serve_modes if m != "proxy"}
        return {**({"ours": modes["proxy"]} if "proxy" in modes else {}), **other, "plain": plain,
                "vs_plain": vs_plain, "modes": list(self.serve_modes),
                "baseline": {"name": f"Predictor.predict_next, journeys of length {SERVE_LENGTH}, 1 torch thread", **raw},
                "ratio": vs_plain[head]["c8"]["requests_per_s"],
                **{f"ratio_{m}": vs_plain[m]["c8"]["requests_per_s"] for m in other},
                "target": TARGETS["serve"], **({"met": met("proxy")} if "proxy" in modes else {}),
                **{f"met_{m}": met(m) for m in other},
                "note": f"one journey of {SERVE_LENGTH} steps per request at concurrency 1/8/32, then {', '.join(map(str, sized))} "
                        f"users per request at concurrency {SIZE_CONCURRENCY}; ours = ingress 'proxy' (the default), "
                        "direct = ingress 'direct', haproxy = ingress 'haproxy' (Ray Serve's HAProxy), plain = the same "
                        "request code on one uvicorn worker (mtorl.serving.plain); ratio = req/s at c=8 / plain's"}

    def stage_scale(self) -> dict[str, Any]:
        import ray

        # the evaluation rows score a small checkpoint of the main dataset (the same simulator: same channels
        # and features) on each scale dataset
        checkpoint = self._ensure_checkpoint() if self.sizes.scale_eval else None
        if ray.is_initialized():
            ray.shutdown()  # each subprocess starts its own local Ray
        points: dict[str, Any] = {}
        for steps in self.sizes.scale:
            csv, fmt, rows = simulate_csv(steps, self.work, self.say)
            uri = f"{BUCKET}/datasets/scale-{steps}"
            p = _child(["prepare", "--csv", str(csv), "--fmt", json.dumps(fmt), "--dataset", uri], self.say)
            csv.unlink(missing_ok=True)
            points[str(steps)] = {"rows": rows, "prepare": p}
            self.say(f"bench: scale {steps:,} steps: prepare {p['wall_s']}s peak {p['peak_mb']:.0f} MiB")
            if self.sizes.scale_epoch:
                e = _child(["epoch", "--dataset", uri, "--device", self.device], self.say)
                points[str(steps)]["epoch"] = e
                self.say(f"bench: scale {steps:,} steps: epoch {e['wall_s']}s peak {e['peak_mb']:.0f} MiB "
                         f"(tree {e['tree_peak_mb']:.0f} MiB)")
            if checkpoint:
                v = _child(["evaluate", "--dataset", uri, "--checkpoint", checkpoint], self.say)
                points[str(steps)]["evaluate"] = v
                self.say(f"bench: scale {steps:,} steps: evaluate {v['wall_s']}s peak {v['peak_mb']:.0f} MiB "
                         f"(tree {v['tree_peak_mb']:.0f} MiB), {v['rows_per_s']:,.0f} steps/s; {v['mode']}")
        small, large = (points[str(s)] for s in self.sizes.scale)
        mem = {"prepare": _ratio(large["prepare"]["peak_mb"], small["prepare"]["peak_mb"])}
        wall = {"prepare": _ratio(large["prepare"]["wall_s"], small["prepare"]["wall_s"])}
        if self.sizes.scale_epoch:
            mem["epoch"] = _ratio(large["epoch"]["peak_mb"], small["epoch"]["peak_mb"])
            mem["epoch_tree"] = _ratio(large["epoch"]["tree_peak_mb"], small["epoch"]["tree_peak_mb"])
            wall["epoch"] = _ratio(large["epoch"]["wall_s"], small["epoch"]["wall_s"])
        if checkpoint:
            mem["evaluate"] = _ratio(large["evaluate"]["peak_mb"], small["evaluate"]["peak_mb"])
            mem["evaluate_tree"] = _ratio(large["evaluate"]["tree_peak_mb"], small["evaluate"]["tree_peak_mb"])
            wall["evaluate"] = _ratio(large["evaluate"]["wall_s"], small["evaluate"]["wall_s"])
        return {"sizes": list(self.sizes.scale), "ours": points, "memory_ratio": mem, "wall_ratio": wall,
                "ratio": max(v for v in mem.values() if v is not None) if any(v is not None for v in mem.values()) else None,
                "steps_ratio": round(self.sizes.scale[1] / self.sizes.scale[0], 1), "target": TARGETS["scale"],
                "met": all(v is not None and v <= 1.5 for v in mem.values()),
                "note": "each measurement in its own subprocess; peak_mb = its VmHWM; tree_peak_mb = sampled peak of the "
                        "summed RSS of its process tree (its own Ray included; shared pages counted per process); evaluate = "
                        "one EvaluateJob with streaming forced (stream_min_steps 0) and the default exact_max_steps, "
                        "scoring a small checkpoint of the main dataset; its steps/s counts test + train steps read"
                        + ("" if self.sizes.scale_epoch else "; epoch timing skipped in --quick (a 1M-step epoch takes "
                           "minutes on 2 cores): run without --quick, or add --scale-epoch")}


def _epoch_history(checkpoint: str | None) -> list[dict[str, Any]]:
    """samples/s and input wait of every epoch, from the run's latest checkpoint."""
    from mtorl import storage
    from mtorl.training.checkpoint import META_FILE

    if not checkpoint or not storage.exists(storage.join(checkpoint, META_FILE)):
        return []
    hist = storage.read_json(storage.join(checkpoint, META_FILE)).get("history", [])
    return [{"epoch": h.get("epoch"), "samples_per_s": round(float(h.get("train/samples_per_s", 0.0)), 1),
             "input_wait_frac": round(float(h.get("train/input_wait_frac", 0.0)), 4)} for h in hist]


# ----------------------------------------------------------------------------- serving load

RECOMMEND_PATH = "/v1/recommend"


def serve_bodies(csv: Path, fmt: dict[str, Any], length: int, n: int) -> list[bytes]:
    """``n`` request bodies, each one user's first ``length`` logged steps in the journeys format."""
    import pyarrow.csv as pacsv

    tab = pacsv.read_csv(str(csv), read_options=pacsv.ReadOptions(block_size=1 << 22))
    rows = tab.slice(0, min(tab.num_rows, 400 * n)).to_pylist()
    by_user: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_user.setdefault(str(r[fmt["user_col"]]), []).append(r)
    bodies = []
    for uid, steps in by_user.items():
        if len(steps) < length:
            continue
        bodies.append(json.dumps(recommend_request(uid, steps[:length], fmt)).encode())
        if len(bodies) == n:
            break
    if not bodies:
        raise RuntimeError(f"no user with {length} steps in the first rows of {csv.name}")
    return bodies


def merge_bodies(bodies: list[bytes], n: int) -> list[bytes]:
    """Request bodies of ``n`` users each, made of the one-user ``bodies`` (user ids made unique)."""
    users = [json.loads(b)["users"][0] for b in bodies]
    out = []
    for k in range(max(1, len(users) // max(1, n // 4))):  # overlapping windows: enough distinct bodies
        group = [dict(users[(k + i) % len(users)], user_id=f"{users[(k + i) % len(users)]['user_id']}-{i}") for i in range(n)]
        out.append(json.dumps({"users": group}).encode())
    return out


class plain_server:
    """``python -m mtorl.serving.plain`` in a subprocess on loopback ``port``: enter -> its base URL once
    /healthz answers; exit -> stopped by PID."""

    def __init__(self, checkpoint: str, port: int, log: Path) -> None:
        self.cmd = [sys.executable, "-m", "mtorl.serving.plain", "--checkpoint", checkpoint, "--port", str(port)]
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> str:
        import http.client

        self._f = open(self.log, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._f, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"plain server exited {self.proc.returncode}: {self.log.read_text()[-500:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", int(self.url.rsplit(":", 1)[1]), timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return self.url
            except OSError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError("plain server did not answer /healthz in 180 s")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._f.close()


def recommend_request(user_id: str, steps: list[dict[str, Any]], fmt: dict[str, Any]) -> dict[str, Any]:
    """One ``/v1/recommend`` request (``mtorl.serving.schemas.RecommendRequest``): a user's logged journey,
    raw values (the server normalises with the checkpoint's manifest)."""
    feats = list(fmt["numeric_features"]) + list(fmt.get("categorical_features") or [])
    journey = [{"channel": str(s[fmt["channel_col"]]), "gain": float(s[fmt["gain_col"]]), "cost": float(s[fmt["cost_col"]]),
                "features": {k: float(s[k]) for k in feats}} for s in steps]
    return {"users": [{"user_id": user_id, "journey": journey,
                       "user_features": {k: float(steps[0][k]) for k in fmt["user_features"]}}]}


def http_load(url: str, bodies: list[bytes], concurrency: int, requests: int) -> dict[str, Any]:
    """``requests`` POSTs from ``concurrency`` threads, one keep-alive connection each; latency percentiles.

    The client is the standard library's ``http.client``: on a 2-core machine the load generator shares the
    CPU with the server, and a heavier client (httpx took 2-7 ms of CPU per request at concurrency 8-32)
    would measure itself more than the server."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host, port, path = u.hostname or "127.0.0.1", u.port or 80, u.path or "/"
    headers = {"content-type": "application/json"}

    def post(conn: "http.client.HTTPConnection", body: bytes) -> tuple[int, bytes]:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()

    warm = http.client.HTTPConnection(host, port, timeout=30.0)
    try:  # warm-up, and fail early with the server's answer
        for b in bodies[:3]:
            status, text = post(warm, b)
            if status != 200:
                raise RuntimeError(f"POST {url} -> {status}: {text[:300]!r}")
    finally:
        warm.close()
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        mine: list[float] = []
        bad = 0
        conn = http.client.HTTPConnection(host, port, timeout=30.0)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                t = time.perf_counter()
                try:
                    status, _ = post(conn, bodies[i % len(bodies)])
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=30.0)
                    status = 0
                mine.append(time.perf_counter() - t)
                bad += status != 200
        finally:
            conn.close()
        with lock:
            lat.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sec = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000.0
    return {"requests": len(lat), "errors": errors[0], "seconds": round(sec, 2),
            "requests_per_s": round(_rate(len(lat), sec), 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2)}


def _test_journeys(uri: str, length: int) -> Iterator[Any]:
    """Prepared test (else train) journeys cut to ``length`` steps (those with at least that many)."""
    import pyarrow.parquet as pq
    from dataclasses import replace

    from mtorl import storage
    from mtorl.data.manifest import load_manifest, shard_uris
    from mtorl.data.windows import journeys_from_table

    m = load_manifest(uri)
    for split in ("test", "train"):
        for u in shard_uris(uri, m, split):
            fs, path = storage.resolve(u)
            for j in journeys_from_table(pq.read_table(path, filesystem=fs), m):
                if j.length >= length:
                    yield replace(j, channel=j.channel[:length], gain=j.gain[:length], cost=j.cost[:length],
                                  propensity=j.propensity[:length], state=j.state[:length], reward=j.reward[:length])


# ----------------------------------------------------------------------------- scale subprocesses

def _child(args: list[str], say: Callable[[str], Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; it prints one JSON line starting with ``BENCH ``."""
    proc = subprocess.run([sys.executable, "-m", "mtorl.bench", "--child", *args], capture_output=True, text=True,
                          env=os.environ.copy())
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("BENCH "):
            return dict(json.loads(line[6:]))
    lines = [ln for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
    tail = "\n".join(lines[-15:])
    raise RuntimeError(f"scale subprocess {args[0]} failed (exit {proc.returncode}): {lines[-1] if lines else 'no output'}\n{tail}")


def run_child(what: str, dataset: str, csv: str | None = None, fmt: str | None = None, device: str = "cpu",
              checkpoint: str | None = None) -> None:
    """One scale-stage measurement in this (fresh) process: ``prepare``, ``epoch`` or ``evaluate``; prints
    ``BENCH {json}``."""
    from types import SimpleNamespace

    from mtorl.spec import make_job

    a = SimpleNamespace(what=what, dataset=dataset, csv=csv, fmt=fmt, device=device)
    if what == "evaluate":
        from mtorl.data.manifest import load_manifest
        from mtorl.evaluation.run import run_evaluate

        with TreePeak() as tree, tempfile.TemporaryDirectory(prefix="mtorl-bench-eval-") as out_dir:
            # streaming forced (stream_min_steps 0): this row shows that its memory stays bounded
            spec = make_job("EvaluateJob", "bench-scale-eval", {"checkpoint": checkpoint, "data": dataset,
                                                                 "output": out_dir, "stream_min_steps": 0}).spec
            t0 = time.perf_counter()
            res = run_evaluate(spec, progress=lambda _m: None)
            wall = time.perf_counter() - t0
        m = load_manifest(dataset)
        read = m.splits["test"].steps + m.splits["train"].steps
        out = {"wall_s": round(wall, 2), "peak_mb": round(_vmhwm_mb(), 1), "tree_peak_mb": round(tree.peak_mb, 1),
               "test_steps": m.splits["test"].steps, "steps_read": read, "rows_per_s": round(_rate(read, wall)),
               "mode": res["mode"]}
        print("BENCH " + json.dumps(out), flush=True)
        return

    if a.what == "prepare":
        from mtorl.data.prepare import prepare

        spec = make_job("PrepareJob", "bench-scale", {"source": "journeys", "input": a.csv, "output": a.dataset,
                                                       "journeys": json.loads(a.fmt)}).spec
        t0 = time.perf_counter()
        m = prepare(spec, progress=lambda _m: None)
        out = {"wall_s": round(time.perf_counter() - t0, 2), "peak_mb": round(_vmhwm_mb(), 1), "rows": m.rows_read,
               "rows_per_s": round(_rate(m.rows_read, time.perf_counter() - t0))}
    else:
        import ray

        from mtorl.raycluster import init_ray
        from mtorl.training.driver import run_train

        with TreePeak() as tree:
            init_ray()
            job = make_job("TrainJob", f"bench-scale-{int(time.time()) % 100000}", {
                "data": a.dataset, "output": f"{BUCKET}/runs", "window": {"length": WINDOW}, "model": MODEL,
                # 2 workers, and streaming forced (cache_windows_max_steps 0): this row shows that streaming
                # memory stays bounded; below its (memory-sized) threshold a split is cached on purpose.
                "trainer": {"workers": 2, "cpus_per_worker": 1, "epochs": 1, "batch_size": batch_size(a.device),
                            "use_gpu": a.device == "cuda", "gpus_per_worker": 1, "cache_windows_max_steps": 0},
                "tracking": {"wandb": "disabled"}})
            t0 = time.perf_counter()
            res = run_train(job, progress=lambda _m: None)
            wall = time.perf_counter() - t0
            peak = _vmhwm_mb()
            ray.shutdown()
        out = {"wall_s": round(wall, 2), "peak_mb": round(peak, 1), "tree_peak_mb": round(tree.peak_mb, 1),
               "samples_per_s": res.get("samples_per_s"), "workers": 2, "data_mode": "streaming"}
    print("BENCH " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- report

def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        v = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def table_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(stage, ours, plain reference, ratio, target, met) rows of the results."""
    rows = []
    st = res["stages"]

    def met(d: dict[str, Any]) -> str:
        return "" if "met" not in d else ("yes" if d["met"] else "**no**")

    for name in STAGES:
        d = st.get(name)
        if d is None:
            continue
        if "error" in d or "skipped" in d:
            rows.append((name, d.get("error") or f"skipped: {d['skipped']}", "", "", TARGETS.get(name, ""), ""))
            continue
        if name == "prepare":
            rows.append(("prepare (rows/s)", _fmt(d["ours"]["rows_per_s"]), f"{_fmt(d['baseline']['rows_per_s'])} (pyarrow CSV -> Parquet)",
                         _fmt(d["ratio"]), "", ""))
        elif name == "stream":
            rows.append(("stream (windows/s)", _fmt(d["ours"]["windows_per_s"]),
                         f"{_fmt(d['baseline']['windows_per_s'])} (plain training consumes)", _fmt(d["ratio"]), d["target"], met(d)))
        elif name == "train":
            for k, r in d["ours"].items():
                first = (r.get("per_epoch") or [None])[0]
                ep1 = (f" (epoch 1: {_fmt(first['samples_per_s'])}, wait {_fmt(100 * first['input_wait_frac'], '%')})"
                       if first and len(r.get("per_epoch") or []) > 1 else "")
                gpu = (f", GPU busy {_fmt(r['gpu_util_mean_pct'], '%')}" if r.get("gpu_util_mean_pct") is not None else "")
                base_gpu = (f", GPU busy {_fmt(d['baseline']['gpu_util_mean_pct'], '%')}"
                            if d["baseline"].get("gpu_util_mean_pct") is not None else "")
                where = "same GPU" if "gpu_util_mean_pct" in d["baseline"] or "gpu_util_pct" in d["baseline"] else "1 thread"
                job = d["baseline"].get("job")
                if k == "1w" and job and r.get("wall_ratio") is not None:
                    rows.append((f"train 1 worker, whole job (wall s, start-up included; {job['epochs']} epochs)",
                                 _fmt(r["wall_s"]), f"{_fmt(job['wall_s'])} (plain job: read windows, build, train + val)",
                                 _fmt(r["wall_ratio"]), "<= 2", "yes" if r["wall_ratio"] <= 2 else "**no**"))
                if k == "1w" and job and d.get("inprocess"):
                    ip = d["inprocess"]
                    rows.append((f"train in process (workers: 0), whole job (wall s, start-up included; {job['epochs']} epochs)",
                                 _fmt(ip["wall_s"]), f"{_fmt(job['wall_s'])} (plain job)", _fmt(ip["wall_ratio"]), "<= 2",
                                 "yes" if ip["wall_ratio"] is not None and ip["wall_ratio"] <= 2 else "**no**"))
                rows.append((f"train {k[0]} worker(s) (samples/s, last epoch)", f"{_fmt(r['samples_per_s'])}, input wait {_fmt(100 * r['input_wait_frac'] if r['input_wait_frac'] is not None else None, '%')}{ep1}{gpu}",
                             f"{_fmt(d['baseline']['windows_per_s'])} (plain loop, {where}{base_gpu})", _fmt(r["ratio"]),
                             d["target"] if k == "1w" else "", met(d) if k == "1w" else ""))
        elif name == "serve":
            raw = d["baseline"]
            labels = [("plain", "plain", "plain uvicorn (reference)"), ("ours", "proxy", "proxy ingress (default)"),
                      ("direct", "direct", "direct ingress"), ("haproxy", "haproxy", "HAProxy ingress")]
            for key, mode, label in labels:
                if key not in d:
                    continue
                for k, r in d[key].items():
                    if k.startswith("users_"):
                        n = int(k.split("_")[1])
                        rows.append((f"serve {label}, {n} users/request at c={SIZE_CONCURRENCY} (journeys/s; p50/p99 ms)",
                                     f"{_fmt(r['journeys_per_s'])}; {_fmt(r['p50_ms'])}/{_fmt(r['p99_ms'])}",
                                     f"{_fmt(raw[f'batch_{n}']['journeys_per_s'])} (raw forward, batch {n})",
                                     _fmt(r["vs_raw"]), "≥ 0.5" if n == max(USERS_PER_REQUEST) and key == "ours" else "", ""))
                        continue
                    vp = d.get("vs_plain", {}).get(mode, {}).get(k)
                    ratio = (f"{_fmt(vp['requests_per_s'])} (p50 {_fmt(vp['p50'])}×, p99 {_fmt(vp['p99'])}×)" if vp else "1")
                    rows.append((f"serve {label}, concurrency {k[1:]} (req/s; p50/p99 ms)",
                                 f"{_fmt(r['requests_per_s'])}; {_fmt(r['p50_ms'])}/{_fmt(r['p99_ms'])}",
                                 "" if key == "plain" else "plain uvicorn, same row", ratio,
                                 d["target"] if k == "c8" and key == "ours" else "",
                                 met({"met": d["met"]}) if k == "c8" and key == "ours"
                                 else met({"met": d[f"met_{key}"]}) if k == "c8" and f"met_{key}" in d else ""))
        elif name == "scale":
            small, large = (d["ours"][str(s)] for s in d["sizes"])
            for part in ("prepare", "epoch", "evaluate"):
                if part not in small:
                    rows.append((f"scale {part}", "skipped in --quick (see note)", "", "", "", ""))
                    continue
                extra = lambda p: (f", tree {_fmt(p['tree_peak_mb'])}" if "tree_peak_mb" in p else "") + (  # noqa: E731
                    f", {_fmt(p['rows_per_s'])} steps/s" if "steps_read" in p else "")
                rows.append((f"scale {part}: {_fmt(d['sizes'][1])} vs {_fmt(d['sizes'][0])} steps (peak MiB; s)",
                             f"{_fmt(large[part]['peak_mb'])}{extra(large[part])}; {_fmt(large[part]['wall_s'])}",
                             f"{_fmt(small[part]['peak_mb'])}{extra(small[part])}; {_fmt(small[part]['wall_s'])}",
                             f"mem {_fmt(d['memory_ratio'][part])}"
                             + (f" (tree {_fmt(d['memory_ratio'][part + '_tree'])})" if part + "_tree" in d["memory_ratio"] else "")
                             + f", time {_fmt(d['wall_ratio'][part])}",
                             d["target"], met({"met": (d["memory_ratio"][part] or 99) <= 1.5})))
    return rows


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    head = (f"Measured {m['date']} on {m['cores']} cores ({m['cpu_model']}{', ' + m['gpu'] if m.get('gpu') else ''}), "
            f"{m.get('memory_gib', '?')} GiB, torch {m['torch']}, ray {m['ray']}, pyarrow {m['pyarrow']}; "
            f"device `{res['device']}`, mode `{res['mode']}`, {res['total_s']:.0f} s in all.\n\n"
            f"```bash\n{res['command']}\n```\n\n")
    lines = ["| stage | ours | plain reference | ratio | target | met |", "|---|---|---|---|---|---|"]
    for r in table_rows(res):
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in r) + " |")
    return head + "\n".join(lines) + "\n"


def update_markdown(path: Path, device: str, body: str) -> None:
    """Replace the section between this device's markers (appended if absent); the rest is kept."""
    start, end = MARK_START.format(device=device), MARK_END.format(device=device)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{start}\n{body}{end}"
    if start in text and end in text:
        a, b = text.index(start), text.index(end) + len(end)
        text = text[:a] + section + text[b:]
    else:
        text = text.rstrip("\n") + f"\n\n## Results ({device})\n\n{section}\n"
    path.write_text(text)


# ----------------------------------------------------------------------------- the suite

class BenchError(MtorlError):
    """The suite can't run as asked (unknown stage, no CUDA device): one line, exit 2."""


@dataclass(frozen=True)
class SuiteOptions:
    """What ``mtorl bench`` was asked for (its flags: see ``mtorl bench --help``)."""

    stages: tuple[str, ...] = STAGES
    quick: bool = False
    device: str = "cpu"
    out: str = "bench"
    markdown: str = "BENCHMARKS.md"
    no_markdown: bool = False
    steps: int | None = None
    scale_steps: tuple[int, int] | None = None
    scale_epoch: bool = False
    compile: bool = False
    requests: int | None = None
    epochs: int | None = None
    work: str | None = None
    serve_modes: tuple[str, ...] = SERVE_MODES
    train_workers: tuple[int, ...] = (1, 2)

    @property
    def partial(self) -> bool:
        """A subset of the stages, serve modes or worker counts: such a run must not replace the whole table."""
        return set(self.stages) != set(STAGES) or set(self.serve_modes) != set(SERVE_MODES) or set(self.train_workers) != {1, 2}


def run_suite(opts: SuiteOptions, command: str) -> bool:
    """Run the stages (each against its plain baseline), write ``results.json`` and the table; True when
    every stage ran (a failed stage is recorded and the others still run). ``command`` is recorded."""
    args = opts
    stages = list(opts.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise BenchError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    bad_modes = [m for m in opts.serve_modes if m not in SERVE_MODES]
    if bad_modes or not opts.serve_modes:
        raise BenchError(f"--serve-modes: unknown or no mode {', '.join(bad_modes)}; choose from {', '.join(SERVE_MODES)}")
    if 1 not in opts.train_workers or any(w < 1 for w in opts.train_workers):
        raise BenchError(f"--train-workers {','.join(map(str, opts.train_workers))}: must include 1 (the stage's "
                         "ratios are the 1-worker run's) and only counts >= 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BenchError(f"mtorl bench --device cuda: no CUDA device visible to torch {torch.__version__} "
                             f"(CUDA build: {torch.version.cuda or 'none'}); run it on a GPU machine, or use --device cpu")
    sizes = QUICK if args.quick else FULL
    over: dict[str, Any] = {}
    if args.steps:
        over["steps"] = args.steps
    if args.requests:
        over["requests"] = args.requests
    if args.epochs:
        over["epochs"] = args.epochs
    if args.scale_epoch:
        over["scale_epoch"] = True
    if args.scale_steps:
        over["scale"] = tuple(args.scale_steps)
    sizes = Sizes(**{**asdict(sizes), **over})
    for k, v in BENCH_ENV.items():
        os.environ.setdefault(k, v)

    def say(msg: str) -> None:
        print(msg, flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="mtorl-bench-") if not args.work else None
    work = Path(args.work) if args.work else Path(tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"kind": "mtorl-bench", "command": command, "mode": "quick" if args.quick else "full",
                           "device": args.device, "sizes": asdict(sizes), "machine": machine_facts(args.device),
                           "stages": {}}
    from mtorl.storage import seaweed

    store_dir = work / "store"
    failed = False
    state = seaweed.up(store_dir, seaweed.free_ports(1)[0])
    try:
        with seaweed.store_environment(state):
            say(f"bench: store {state.endpoint} (pid {state.pid}); stages {', '.join(stages)}; mode {res['mode']}; "
                f"device {args.device}")
            bench = Bench(sizes, args.device, work, say)
            bench.compile = args.compile
            bench.serve_modes, bench.workers = tuple(args.serve_modes), tuple(sorted(set(args.train_workers)))
            for name in stages:
                say(f"\n=== bench {name}")
                t0 = time.perf_counter()
                try:
                    out = getattr(bench, f"stage_{name}")()
                except Exception as e:  # noqa: BLE001 - a failed stage is recorded, the others still run
                    failed = True
                    traceback.print_exc()
                    out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
                out["stage_s"] = round(time.perf_counter() - t0, 1)
                res["stages"][name] = out
                say(f"bench {name}: " + json.dumps({k: v for k, v in out.items() if k in ("ratio", "met", "error", "stage_s")}))
            for name in STAGES:
                res["stages"].setdefault(name, {"skipped": "not in --stages"})
            import ray

            if ray.is_initialized():
                ray.shutdown()
    finally:
        seaweed.down(store_dir)
        if tmp is not None:
            tmp.cleanup()
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    path = out_dir / ("results.json" if args.device == "cpu" else f"results-{args.device}.json")
    path.write_text(json.dumps(res, indent=2) + "\n")
    say(f"\nbench: wrote {path}")
    table = markdown(res)
    print(table)
    if args.no_markdown:
        pass
    elif args.partial and MARK_START.format(device=args.device) in (Path(args.markdown).read_text()
                                                                     if Path(args.markdown).exists() else ""):
        # a partial run must not replace the whole-suite table (a file without one gets this run's)
        say(f"bench: a partial run (stages {', '.join(stages)}; serve modes {', '.join(args.serve_modes)}; train workers "
            f"{','.join(map(str, args.train_workers))}): {args.markdown} left unchanged (the table above is this run's)")
    else:
        update_markdown(Path(args.markdown), args.device, table)
        say(f"bench: updated the table in {args.markdown}")
    return not failed


if __name__ == "__main__":
    from mtorl.cli import bench_main

    raise SystemExit(bench_main())
