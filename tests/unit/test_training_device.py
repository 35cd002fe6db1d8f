"""The GPU training path, checked without a GPU: process-group backend, placement order of model,
optimizer and resumed state, metric sums over a 2-process gloo group, device-independent checkpoints."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import socket
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from mtorl.training import checkpoint as ckpt
from mtorl.training.step import autocast, dist_backend, place_for_training, to_device


# The smallest valid data manifest (checkpoint metadata carries one).
MANIFEST = {"schema_version": 1, "version": "v1", "channels": ["a", "b"], "step_features": [], "user_features": [],
            "normalization": {"mean": [], "std": []}, "reward_norm": {"min": 0.0, "max": 1.0}, "penalty": 0.0,
            "splits": {}}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))


def _adamw(params):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(params, lr=1e-2)


def _trained_optimizer_state() -> dict:
    m = _model()
    opt = _adamw(m.parameters())
    m(torch.randn(5, 4)).sum().backward()
    opt.step()
    return opt.state_dict()


# ------------------------------------------------------------------ backend string

def test_gpu_backend_routes_cpu_tensors_to_gloo() -> None:
    from ray.train.torch.config import _is_backend_nccl

    assert dist_backend(False) == "gloo"
    b = dist_backend(True)
    pairs = dict(item.split(":") for item in b.split(","))
    assert pairs == {"cpu": "gloo", "cuda": "nccl"}
    assert _is_backend_nccl(b)  # Ray Train still applies its NCCL settings to the combined string


def test_driver_passes_the_backend_to_torch_config() -> None:
    src = (Path(__file__).parents[2] / "mtorl" / "training" / "driver.py").read_text()
    assert "TorchConfig(backend=dist_backend(t.use_gpu))" in src


# ------------------------------------------------------------------ placement order on resume

def test_resumed_optimizer_state_follows_the_model_to_its_device() -> None:
    """``meta`` stands in for a GPU: tensors move there without any data, so placement is visible."""
    state = _trained_optimizer_state()
    seen: list[str] = []

    def make(params):  # type: ignore[no-untyped-def]
        params = list(params)
        seen.extend(p.device.type for p in params)
        return _adamw(params)

    model = _model()
    opt = place_for_training(model, torch.device("meta"), make, state)
    assert seen and set(seen) == {"meta"}  # the optimizer was built over parameters already on the device
    assert {p.device.type for p in model.parameters()} == {"meta"}
    moments = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert moments and {t.device.type for t in moments} == {"meta"}


def test_the_old_order_leaves_state_behind() -> None:
    """The fault being fixed: state loaded before the model moves stays on the CPU."""
    model = _model()
    opt = _adamw(model.parameters())
    opt.load_state_dict(_trained_optimizer_state())
    model.to("meta")
    moments = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert {t.device.type for t in moments} == {"cpu"}


def test_no_state_builds_a_fresh_optimizer_on_the_device() -> None:
    model = _model()
    opt = place_for_training(model, torch.device("meta"), _adamw, None)
    assert not opt.state and all(p.device.type == "meta" for g in opt.param_groups for p in g["params"])


# ------------------------------------------------------------------ metric sums over a gloo group

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, port: int, backend: str, out: "mp.Queue[object]") -> None:
    import torch.distributed as dist

    from mtorl.training.step import gather_all, sum_all

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        sums = sum_all({"loss": 1.5 + rank, "_steps": 10.0 * (rank + 1)})
        gathered = gather_all(np.array([rank, rank], dtype=np.int64))
        out.put((rank, sums, gathered.tolist()))
    finally:
        dist.destroy_process_group()


def test_metric_sums_on_a_two_process_gloo_group() -> None:
    # The CPU half of the GPU backend ("cpu:gloo"): the same device->backend routing the GPU run uses
    # for the CPU float64 metric tensor (NCCL itself is not built into a CPU-only torch).
    backend = next(item for item in dist_backend(True).split(",") if item.startswith("cpu:"))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, backend, out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict((r, (s, g)) for r, s, g in (out.get(timeout=120) for _ in procs))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    for r in (0, 1):
        sums, gathered = got[r]
        assert sums == {"loss": 4.0, "_steps": 30.0}
        assert gathered == [0, 0, 1, 1]


# ------------------------------------------------------------------ step on the device

@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_is_bf16_on_gpu_only() -> None:
    assert isinstance(autocast(torch.device("cpu")), nullcontext)
    assert isinstance(autocast(torch.device("cuda"), bf16=False), nullcontext)  # no bf16: full precision, no fp16
    ac = autocast(torch.device("cuda"), bf16=True)
    assert isinstance(ac, torch.autocast) and ac.fast_dtype == torch.bfloat16


def test_cpu_batches_stay_plain_cpu_tensors() -> None:
    nb = {"state": np.zeros((2, 3, 4), np.float32), "prev_channel": np.zeros((2, 3), np.int64),
          "prev_reward": np.zeros((2, 3), np.float32), "mask": np.ones((2, 3), bool)}
    b = to_device(nb, torch.device("cpu"))
    assert b.state.device.type == "cpu"
    assert b.state.shape == (2, 3, 4) and b.channel.dtype == torch.int64


# ------------------------------------------------------------------ device-independent checkpoints

@pytest.fixture
def cuda_tagged_saves():  # type: ignore[no-untyped-def]
    """Make ``torch.save`` tag every CPU storage as ``cuda:0``: the bytes a CUDA-placed tensor writes.

    A real CUDA tensor can't be made here, and the ``meta`` device can't be saved at all (it holds no
    data: ``.cpu()`` raises "Cannot copy out of meta tensor"), so this is the closest CPU stand-in."""
    import torch.serialization as ser

    def tagger(obj):  # type: ignore[no-untyped-def]
        return "cuda:0" if getattr(obj, "device", None) is not None and obj.device.type == "cpu" else None

    entry = (0, tagger, lambda obj, location: None)  # priority 0: runs before the built-in cpu tagger
    ser._package_registry.insert(0, entry)
    try:
        yield
    finally:
        ser._package_registry.remove(entry)


def test_gpu_tagged_optimizer_state_loads_on_cpu(tmp_path: Path, cuda_tagged_saves: None) -> None:
    state = _trained_optimizer_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the stand-in really reads as CUDA-placed
            torch.load(io.BytesIO(data), weights_only=True)
    d = tmp_path / "ck"
    model = _model()
    ckpt.write_checkpoint_dir(d, model, None, {"epoch": 0, "step": 1, "manifest": MANIFEST, "spec": {}})
    (d / ckpt.OPTIM_FILE).write_bytes(data)
    meta = json.loads((d / ckpt.META_FILE).read_text())
    meta["sha256"][ckpt.OPTIM_FILE] = ckpt._sha256(data)
    meta_bytes = json.dumps(meta).encode()
    (d / ckpt.META_FILE).write_bytes(meta_bytes)
    blobs = {n: (d / n).read_bytes() for n in meta["sha256"]}  # re-sign the planted state (checksums.json)
    ckpt.write_checksums(d, {**blobs, ckpt.META_FILE: meta_bytes})
    loaded = ckpt.load_checkpoint(str(d), with_optimizer=True)  # map_location cpu
    assert loaded.optimizer_state is not None
    moments = [v for s in loaded.optimizer_state["state"].values() for k, v in s.items() if k != "step"]
    assert moments and all(t.device.type == "cpu" for t in moments)
    m2 = _model()
    opt2 = place_for_training(m2, torch.device("cpu"), _adamw, loaded.optimizer_state)
    m2(torch.randn(5, 4)).sum().backward()
    opt2.step()  # the resumed state works on a CPU-only machine


def test_checkpoint_files_hold_cpu_tensors_only(tmp_path: Path) -> None:
    model = _model()
    opt = _adamw(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    meta = {"epoch": 0, "step": 1, "manifest": MANIFEST, "spec": {}}
    d = ckpt.write_checkpoint_dir(tmp_path / "ck", model, opt, meta)
    # No map_location: every storage must say "cpu" in the file itself.
    raw = torch.load(d / ckpt.OPTIM_FILE, weights_only=True)
    tensors = [v for s in raw["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    from safetensors import safe_open

    with safe_open(str(d / ckpt.MODEL_FILE), framework="pt", device="cpu") as f:
        assert set(f.keys()) == set(model.state_dict())


# ------------------------------------------------------------------ spec: one rank per GPU

def test_spec_rejects_two_ranks_per_gpu() -> None:
    from pydantic import ValidationError

    from mtorl.spec.models import TrainerSpec

    with pytest.raises(ValidationError, match="one rank per GPU"):
        TrainerSpec(workers=2, use_gpu=True, gpus_per_worker=0.5)
    assert TrainerSpec(workers=2, use_gpu=True, gpus_per_worker=1).gpus_per_worker == 1
    assert TrainerSpec(workers=1, use_gpu=True, gpus_per_worker=0.5).workers == 1  # one rank: a shared GPU is fine
    assert TrainerSpec().compile is False
