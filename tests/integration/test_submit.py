"""`mtorl submit` against a REAL 2-node Ray cluster started with cluster/local/up.sh (subprocesses only:
the test process may already be connected to the session's own Ray), with SeaweedFS as the object store.

The nodes get 3 logical CPUs each and the two training workers 2 CPUs each, so Ray must put one worker
on each node (4 > 3) and every node keeps 1 CPU for the Ray Data read tasks (see the 2-CPU hang notes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from mtorl import storage
from tests.fixtures.datasets import JOURNEYS_FORMAT, SMALL_MODEL, write_journeys_csv

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SECRET_ENV = "AWS_SECRET_ACCESS_KEY"


def _env(state_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "MTORL_CLUSTER_DIR": str(state_dir), "PYTHON": sys.executable,
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")})
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(args[:6])} ...\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-4000:]}")
    return p


def _mtorl(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "mtorl", *args], env, timeout)


@pytest.fixture(scope="module")
def cluster(s3_store: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Head + 1 worker node on free loopback ports; torn down by PID (process group), never `ray stop`."""
    state_dir = tmp_path_factory.mktemp("ray-cluster")
    env = _env(state_dir)
    try:
        # a busy machine can need a node restart or two (Ray's fixed 30 s start-up windows)
        up = _run([str(ROOT / "cluster/local/up.sh"), "1", "--cpus-per-node", "3"], env, timeout=420)
        assert up.returncode == 0, up.stderr
        state = json.loads((state_dir / "cluster.json").read_text())
        yield {"env": env, "state": state, "address": state["dashboard"], "state_dir": state_dir}
    finally:
        down = _run([str(ROOT / "cluster/local/down.sh")], env, timeout=120)
        assert down.returncode == 0, down.stderr
        assert not (state_dir / "cluster.json").exists()


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _train_spec(tmp: Path, name: str, data: str, out: str) -> Path:
    return _write(tmp / f"{name}.yaml", {
        "apiVersion": "mtorl/v1", "kind": "TrainJob", "metadata": {"name": name},
        "spec": {"data": data, "output": out, "window": {"length": 8}, "model": SMALL_MODEL,
                 "trainer": {"workers": 2, "cpus_per_worker": 2, "epochs": 1, "batch_size": 16, "keep_top_k": 1,
                             "max_failures": 0},
                 "tracking": {"wandb": "disabled"}},
    })


def test_train_job_runs_on_both_nodes_and_checkpoints_to_object_store(cluster: dict[str, Any], s3_bucket: str,
                                                                     tmp_path: Path) -> None:
    from mtorl.data.prepare import prepare
    from mtorl.spec import make_job

    env = cluster["env"]
    csv = write_journeys_csv(tmp_path / "journeys.csv", users=80)
    data = f"{s3_bucket}/submit/data"
    # in this process (the CLI's prepare has its own tests): the data only has to be in the store
    prepare(make_job("PrepareJob", "prep", {"source": "journeys", "input": str(csv), "output": data,
                                            "journeys": JOURNEYS_FORMAT}).spec, progress=lambda *_: None)

    result = tmp_path / "result.json"
    p = _mtorl(env, "submit", str(_train_spec(tmp_path, "two-nodes", data, f"{s3_bucket}/submit/runs")),
               "--address", cluster["address"], "--wait", "--result", str(result))
    assert p.returncode == 0, p.stderr
    sid = p.stdout.split("submitted ", 1)[1].split()[0]

    res = json.loads(result.read_text())
    assert len(set(res["node_ids"])) == 2, f"training ran on {res['node_ids']}, expected both nodes"
    assert res["best_checkpoint"].startswith(f"{s3_bucket}/submit/runs/two-nodes/")
    assert storage.exists(storage.join(res["best_checkpoint"], "model.safetensors"))
    assert storage.exists(f"{s3_bucket}/submit/runs/two-nodes/best.json")

    # the jobs commands see the same job; the credentials appear nowhere
    status = _mtorl(env, "jobs", "status", sid, "--address", cluster["address"])
    assert status.returncode == 0 and "type: Succeeded" in status.stdout
    logs = _mtorl(env, "jobs", "logs", sid, "--address", cluster["address"])
    listing = _mtorl(env, "jobs", "list", "--address", cluster["address"])
    assert sid in listing.stdout
    secret = os.environ[SECRET_ENV]
    for out in (p, status, logs, listing):
        assert secret not in out.stdout and secret not in out.stderr


def test_failing_entrypoint_exits_non_zero_with_the_error_visible(cluster: dict[str, Any], s3_bucket: str,
                                                                   tmp_path: Path) -> None:
    spec = _train_spec(tmp_path, "no-data", f"{s3_bucket}/submit/no-such-dataset", f"{s3_bucket}/submit/runs")
    p = _mtorl(cluster["env"], "submit", str(spec), "--address", cluster["address"], "--wait")
    assert p.returncode == 1
    assert "no-such-dataset" in p.stdout + p.stderr  # the entrypoint's error (missing manifest), streamed
    assert "failed" in p.stderr


def test_deadline_stops_the_job(cluster: dict[str, Any], s3_bucket: str, tmp_path: Path) -> None:
    spec = _write(tmp_path / "sim.yaml", {"apiVersion": "mtorl/v1", "kind": "SimulateJob", "metadata": {"name": "slow"},
                                          "spec": {"output": f"{s3_bucket}/submit/sim", "users": 5_000_000,
                                                   "runPolicy": {"activeDeadlineSeconds": 3}}})
    p = _mtorl(cluster["env"], "submit", str(spec), "--address", cluster["address"], "--wait")
    assert p.returncode == 1
    assert "exceeded runPolicy.activeDeadlineSeconds=3" in p.stderr


def test_wrong_address_is_one_clear_line(s3_store: Any, tmp_path: Path) -> None:
    env = _env(tmp_path / "no-cluster")
    spec = _write(tmp_path / "sim.yaml", {"apiVersion": "mtorl/v1", "kind": "SimulateJob", "metadata": {"name": "x"},
                                          "spec": {"output": "s3://nowhere/sim"}})
    from mtorl.jobs import free_port

    addr = f"http://127.0.0.1:{free_port()}"
    p = _mtorl(env, "submit", str(spec), "--address", addr, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().startswith(f"error: cannot reach the Ray dashboard at {addr}: ")
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
