"""Jobs on a Ray cluster through the Ray Jobs API (`mtorl submit`, `mtorl jobs ...`), and a local
multi-node cluster on loopback for development (`cluster/local/up.sh`, `down.sh`).

A submission ships a *staging directory* as the job's ``working_dir``: a copy of the ``mtorl`` and
``ray_jobs`` packages plus ``mtorl-job/spec.yaml`` (the spec with every ``--set`` applied). The
entrypoint is ``python -m ray_jobs.<kind> mtorl-job/spec.yaml``, so the cluster runs exactly the
code and the spec the user validated here. ``python`` resolves through the raylet's PATH: start
``ray start`` from the project's virtualenv (or use an image that has mtorl installed).

Kubeflow-style run policy (``spec.runPolicy``):
  * ``retries``: with ``--wait``, a Failed attempt is resubmitted up to N times (a Stopped one is not);
  * ``activeDeadlineSeconds``: counted from the first submission over all attempts. With ``--wait``
    the job is stopped when it expires; the entrypoint also gets ``MTORL_ACTIVE_DEADLINE_SECONDS``
    and stops itself, so the limit holds without ``--wait`` too.

Secrets (the object-store keys, ``WANDB_API_KEY``) never travel in the job's ``runtime_env.env_vars``:
Ray writes those to its logs and job table. They go in ``mtorl-job/credentials.json`` (mode 0600, kept
by Ray's packaging) inside the working_dir, and the job gets only its path, ``MTORL_CREDENTIALS_FILE``
(see mtorl.storage.credentials). The package sits in the cluster's GCS: use token auth on real clusters,
or ``--no-credentials`` when the nodes hold their own (a Kubernetes Secret, see cluster/kuberay/).
Everything this module prints goes through ``_redact``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from mtorl.errors import MtorlError
from mtorl.localhost import free_port, pid_alive

SPEC_PATH = "mtorl-job/spec.yaml"  # inside the working_dir
COPY_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.parquet", ".pytest_cache")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "WANDB_API_KEY", "RAY_AUTH_TOKEN")
CREDENTIAL_PREFIXES = ("AWS_",)
CREDENTIALS_PATH = "mtorl-job/credentials.json"  # inside the working_dir, mode 0600
FORWARD_PREFIXES = ("WANDB_", "RAY_DATA_", "RAY_TRAIN_")
FORWARD_NAMES = ("RAY_AUTH_MODE", "MTORL_STORE_DIR", "RAY_USAGE_STATS_ENABLED")
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(MtorlError):
    """The dashboard can't be reached or refused a request: printed as one line (exit 1: the cluster, not
    the input, is what failed)."""

    exit_code = 1


def _p(msg: str = "", err: bool = False) -> None:
    print(_redact(msg), file=sys.stderr if err else sys.stdout, flush=True)


def _redact(text: str) -> str:
    for name in SECRET_ENV:
        v = os.environ.get(name)
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    return text


# ------------------------------------------------------------------------------------- client

def dashboard_address(address: str | None) -> str:
    """--address, else RAY_ADDRESS (when it is an http URL), else the local cluster's state file, else :8265."""
    addr = address or os.environ.get("RAY_ADDRESS", "")
    if not addr.startswith(("http://", "https://")) and not address:
        state = _read_state(_state_dir(None))
        addr = state["dashboard"] if state else DEFAULT_DASHBOARD
    if not addr.startswith(("http://", "https://")):
        addr = f"http://{addr}"
    return addr.rstrip("/")


def connect(address: str | None) -> Any:
    """A JobSubmissionClient, after a direct probe that turns a wrong address into one clear line."""
    addr = dashboard_address(address)
    try:
        with urllib.request.urlopen(f"{addr}/api/version", timeout=10) as r:
            r.read()
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):  # auth errors: let the client explain them below
            raise ClusterError(f"cannot reach the Ray dashboard at {addr}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ClusterError(f"cannot reach the Ray dashboard at {addr}: {reason}") from None
    import logging

    from ray.job_submission import JobSubmissionClient

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):  # package-upload and websocket chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(addr)
    except Exception as e:  # noqa: BLE001 - ConnectionError, auth RuntimeError...: one line
        raise ClusterError(f"cannot reach the Ray dashboard at {addr}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return _redact(" ".join(lines[:3]) or type(e).__name__)


# ------------------------------------------------------------------------------------- submit

@dataclass
class Submission:
    kind: str
    name: str
    entrypoint: str
    runtime_env: dict[str, Any]
    result_base: str | None   # <base>/<submission id>/result.json
    retries: int
    deadline_s: int | None


def result_base(job: Any) -> str | None:
    """Where results of this job's submissions go: ``$MTORL_JOBS_URI``, else ``<spec.output>/_jobs``
    (ServeJob: ``s3://<checkpoint bucket>/_jobs``)."""
    from mtorl import storage

    if os.environ.get("MTORL_JOBS_URI"):
        return os.environ["MTORL_JOBS_URI"].rstrip("/")
    out = getattr(job.spec, "output", None)
    if out:
        return storage.join(out, "_jobs")
    ck = getattr(job.spec, "checkpoint", "") or ""
    if ck.startswith("s3://"):
        return f"s3://{ck[5:].split('/', 1)[0]}/_jobs"
    return None


def _local_path_warnings(job: Any) -> list[str]:
    warn = []
    for field in ("input", "data", "output", "checkpoint"):
        v = getattr(job.spec, field, None)
        if isinstance(v, str) and v and "://" not in v and not os.path.isabs(v):
            warn.append(f"warning: spec.{field}={v!r} is a relative local path: on the cluster it resolves inside "
                        "the job's temporary working directory; use s3:// or an absolute path every node can read")
    return warn


def job_env(job: Any, credentials: bool = True) -> dict[str, str]:
    """Environment of the job: the object-store endpoint and region (unless the nodes hold their own),
    W&B mode, Ray Data/Train settings, RAY_AUTH_MODE. Never a secret (Ray logs this): see job_secrets."""
    from mtorl.storage.credentials import looks_secret

    env: dict[str, str] = {}
    for k, v in os.environ.items():
        if looks_secret(k) or k == "MTORL_CREDENTIALS_FILE":
            continue
        if (credentials and k.startswith(CREDENTIAL_PREFIXES)) or k.startswith(FORWARD_PREFIXES) or k in FORWARD_NAMES:
            env[k] = v
    if credentials and job_secrets():
        env["MTORL_CREDENTIALS_FILE"] = CREDENTIALS_PATH  # relative: the entrypoint makes it absolute
    # the entrypoint's ray.init passes its own runtime_env (env_vars): let Ray merge it with the job's
    env["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    tracking = getattr(job.spec, "tracking", None) or getattr(getattr(job.spec, "base", None), "tracking", None)
    if tracking is not None:
        env.setdefault("WANDB_MODE", tracking.wandb)
    return env


def job_secrets() -> dict[str, str]:
    """The secrets a job's workers need (object-store keys, WANDB_API_KEY) from this environment."""
    from mtorl.storage.credentials import SECRET_NAMES

    return {k: os.environ[k] for k in SECRET_NAMES if os.environ.get(k)}


def _write_secrets(root: Path) -> None:
    path = root / CREDENTIALS_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(job_secrets()).encode())
    finally:
        os.close(fd)


def stage(job: Any, root: Path) -> Path:
    """Copy the mtorl and ray_jobs packages into ``root`` and write the resolved spec; returns root."""
    import mtorl
    import ray_jobs
    from mtorl.spec import job_to_yaml

    for pkg in (mtorl, ray_jobs):
        src = Path(list(pkg.__path__)[0]).resolve()  # __path__: also right for an editable install
        shutil.copytree(src, root / src.name, ignore=COPY_IGNORE)
    spec = root / SPEC_PATH
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(job_to_yaml(job))
    return root


def prepare_submission(job: Any, staging: Path, credentials: bool = True) -> Submission:
    from mtorl.registry import lookup

    module = lookup(job.kind, f"{job.kind} {job.metadata.name}").command  # the ray_jobs entrypoint
    stage(job, staging)
    if credentials and job_secrets():
        _write_secrets(staging)
    rp = job.spec.run_policy
    return Submission(
        kind=job.kind, name=job.metadata.name, entrypoint=f"python -m ray_jobs.{module} {SPEC_PATH}",
        runtime_env={"working_dir": str(staging), "env_vars": job_env(job, credentials)},
        result_base=result_base(job), retries=rp.retries, deadline_s=rp.active_deadline_seconds,
    )


def _submit_attempt(client: Any, sub: Submission, sid: str, attempt: int, deadline_at: float | None) -> str:
    env = dict(sub.runtime_env["env_vars"])
    meta = {"mtorl_kind": sub.kind, "mtorl_name": sub.name, "mtorl_attempt": str(attempt)}
    if sub.result_base:
        env["MTORL_RESULT_URI"] = meta["mtorl_result_uri"] = f"{sub.result_base}/{sid}/result.json"
    if deadline_at is not None:
        env["MTORL_ACTIVE_DEADLINE_SECONDS"] = str(max(1, int(deadline_at - time.time())))
    env["MTORL_SUBMISSION_ID"] = sid
    try:
        return str(client.submit_job(entrypoint=sub.entrypoint, submission_id=sid, metadata=meta,
                                     runtime_env={**sub.runtime_env, "env_vars": env}, entrypoint_num_cpus=0))
    except Exception as e:  # noqa: BLE001
        raise ClusterError(f"submitting {sub.kind} {sub.name} failed: {_one_line(e)}") from None


def submit_job(job: Any, address: str | None, wait: bool = False, result_file: str | None = None,
               credentials: bool = True) -> bool:
    """Submit a validated job (a kind of the registry, else ``SpecError``). Without ``wait``: True once
    submitted. With ``wait``: follow it under its runPolicy; True when it succeeded (and its result, if
    asked for, was fetched into ``result_file``). ``ClusterError`` when the dashboard fails us."""
    from mtorl.registry import lookup

    lookup(job.kind, f"{job.kind} {job.metadata.name}")  # refused before any cluster call
    for w in _local_path_warnings(job):
        _p(w, err=True)
    client = connect(address)
    with tempfile.TemporaryDirectory(prefix="mtorl-submit-") as tmp:
        sub = prepare_submission(job, Path(tmp), credentials=credentials)
        if not wait:
            if sub.retries:
                _p(f"note: runPolicy.retries={sub.retries} is applied only with --wait", err=True)
            deadline_at = time.time() + sub.deadline_s if sub.deadline_s else None
            sid = _submit_attempt(client, sub, new_submission_id(sub.name), 1, deadline_at)
            _p(f"submitted {sid}")
            _p(f"follow it with: mtorl jobs logs {sid} --follow --address {dashboard_address(address)}")
            return True
        return _supervise(client, sub, result_file)


def new_submission_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _supervise(client: Any, sub: Submission, result_file: str | None) -> bool:
    """Submit, stream the logs, retry failed attempts, enforce the deadline. True when the job succeeded."""
    t0 = time.time()
    deadline_at = t0 + sub.deadline_s if sub.deadline_s else None
    base = new_submission_id(sub.name)
    for attempt in range(1, sub.retries + 2):
        sid = base if attempt == 1 else f"{base}-retry{attempt - 1}"
        sid = _submit_attempt(client, sub, sid, attempt, deadline_at)
        _p(f"submitted {sid}" + (f" (attempt {attempt} of {sub.retries + 1})" if sub.retries else ""))
        status = follow(client, sid, deadline_at)
        if status == "DEADLINE":
            _stop_quietly(client, sid)
            _p(f"error: {sub.kind} {sub.name} ({sid}) exceeded runPolicy.activeDeadlineSeconds={sub.deadline_s}; "
               "the job was stopped", err=True)
            return False
        info = client.get_job_info(sid)
        if status == "SUCCEEDED":
            _p(f"job {sid} succeeded in {time.time() - t0:.1f} s")
            return _fetch_result(info, result_file)
        msg = _redact((info.message or "").strip())
        _p(f"job {sid} {status.lower()}: {msg.splitlines()[0] if msg else 'no message'}", err=True)
        if status == "STOPPED":
            return False
        if attempt <= sub.retries:
            _p(f"retrying: attempt {attempt + 1} of {sub.retries + 1} (runPolicy.retries={sub.retries})", err=True)
    return False


def _fetch_result(info: Any, result_file: str | None) -> bool:
    uri = (info.metadata or {}).get("mtorl_result_uri")
    if not result_file:
        if uri:
            _p(f"result: {uri}")
        return True
    if not uri:
        _p("error: this job kind stores no result (no output URI)", err=True)
        return False
    from mtorl import storage

    try:
        data = storage.read_bytes(uri)
    except Exception as e:  # noqa: BLE001 - StorageError and friends: one line
        _p(f"error: the job succeeded but its result could not be read from {uri}: {_one_line(e)}", err=True)
        return False
    Path(result_file).parent.mkdir(parents=True, exist_ok=True)
    Path(result_file).write_bytes(data)
    _p(f"result written to {result_file}")
    return True


def _stop_quietly(client: Any, sid: str) -> None:
    try:
        client.stop_job(sid)
    except Exception:  # noqa: BLE001 - already finished
        pass


def follow(client: Any, sid: str, deadline_at: float | None = None) -> str:
    """Stream a job's logs until it ends. Returns its final status name, or "DEADLINE"."""
    printed = [0]

    def out(chunk: str) -> None:
        sys.stdout.write(_redact(chunk))
        sys.stdout.flush()
        printed[0] += len(chunk)

    async def tail() -> bool:  # True: the stream ended, False: the deadline passed
        agen = client.tail_job_logs(sid).__aiter__()
        while True:
            timeout = None if deadline_at is None else max(0.0, deadline_at - time.time())
            try:
                out(await asyncio.wait_for(agen.__anext__(), timeout))
            except StopAsyncIteration:
                return True
            except asyncio.TimeoutError:
                return False

    try:
        if not asyncio.run(tail()):
            return "DEADLINE"
    except Exception:  # noqa: BLE001 - websocket trouble: poll instead
        pass
    while True:  # the stream ended (or broke): poll until the status is terminal, printing what's new
        status = _status_name(client.get_job_status(sid))
        logs = client.get_job_logs(sid)
        if len(logs) > printed[0]:
            out(logs[printed[0]:])
        if status in TERMINAL:
            return status
        if deadline_at is not None and time.time() >= deadline_at:
            return "DEADLINE"
        time.sleep(1.0)


def _status_name(s: Any) -> str:
    return str(getattr(s, "value", s)).upper()


# ------------------------------------------------------------------------------------- jobs

def _ts(ms: int | None) -> str | None:
    if not ms:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def conditions(info: Any) -> list[dict[str, Any]]:
    """Kubeflow-style conditions from a Ray JobInfo (PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED).
    Ray records only the submission and end times, so Running has no time of its own."""
    status = _status_name(info.status)
    start, end = _ts(info.start_time), _ts(info.end_time)
    msg = _redact((info.message or "").strip().splitlines()[0] if info.message else "")
    conds = [{"type": "Created", "status": "True", "reason": "JobSubmitted", "lastTransitionTime": start}]
    if status == "PENDING":
        conds.append({"type": "Pending", "status": "True", "reason": "JobPending", "message": msg, "lastTransitionTime": start})
    elif status == "RUNNING":
        conds.append({"type": "Running", "status": "True", "reason": "JobRunning", "message": msg, "lastTransitionTime": None})
    else:
        conds.append({"type": "Running", "status": "False", "reason": "JobEnded", "lastTransitionTime": end})
        if status == "SUCCEEDED":
            conds.append({"type": "Succeeded", "status": "True", "reason": "JobSucceeded", "message": msg, "lastTransitionTime": end})
        else:
            reason = "JobStopped" if status == "STOPPED" else "JobFailed"
            conds.append({"type": "Failed", "status": "True", "reason": reason, "message": msg, "lastTransitionTime": end})
    return conds


def describe(info: Any) -> dict[str, Any]:
    meta = info.metadata or {}
    return {
        "submissionId": info.submission_id, "kind": meta.get("mtorl_kind"), "name": meta.get("mtorl_name"),
        "attempt": meta.get("mtorl_attempt"), "entrypoint": info.entrypoint, "result": meta.get("mtorl_result_uri"),
        "status": {"phase": _status_name(info.status).capitalize(), "startTime": _ts(info.start_time),
                   "completionTime": _ts(info.end_time), "conditions": conditions(info)},
    }  # runtime_env is deliberately left out: it holds the credentials


def jobs_action(address: str | None, action: str, sid: str | None, follow: bool = False,
                result_file: str | None = None) -> bool:
    """``mtorl jobs list | status ID | logs ID [--follow] | stop ID | result ID``: False when the job did
    not succeed (logs --follow, result); ``ClusterError`` (one line) for an unknown id or a server error."""
    client = connect(address)
    try:
        return _jobs_action(client, action, sid or "", follow, result_file)
    except ClusterError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown id, server errors: one line
        raise ClusterError(_one_line(e)) from None


def _jobs_action(client: Any, action: str, sid: str, follow_logs: bool, out: str | None) -> bool:
    if action == "list":
        jobs = [j for j in client.list_jobs() if j.submission_id]
        jobs.sort(key=lambda j: j.start_time or 0)
        _p(f"{'SUBMISSION ID':<44} {'KIND':<12} {'STATUS':<10} {'STARTED':<21} ENDED")
        for j in jobs:
            meta = j.metadata or {}
            _p(f"{j.submission_id:<44} {meta.get('mtorl_kind', '-'):<12} {_status_name(j.status):<10} "
               f"{_ts(j.start_time) or '-':<21} {_ts(j.end_time) or '-'}")
        return True
    if action == "status":
        _p(yaml.safe_dump(describe(client.get_job_info(sid)), sort_keys=False).rstrip())
        return True
    if action == "logs":
        if follow_logs:
            return follow(client, sid) == "SUCCEEDED"
        sys.stdout.write(_redact(client.get_job_logs(sid)))
        return True
    if action == "stop":
        stopped = client.stop_job(sid)
        _p(f"stop requested for {sid}" if stopped else f"{sid} had already finished")
        return True
    if action == "result":
        info = client.get_job_info(sid)
        status = _status_name(info.status)
        if status != "SUCCEEDED":
            _p(f"error: job {sid} is {status.lower()}: no result", err=True)
            return False
        if out:
            return _fetch_result(info, out)
        uri = (info.metadata or {}).get("mtorl_result_uri")
        if not uri:
            _p("error: this job stores no result", err=True)
            return False
        from mtorl import storage

        try:
            _p(json.dumps(json.loads(storage.read_bytes(uri)), indent=2))
        except Exception as e:  # noqa: BLE001
            _p(f"error: cannot read the result at {uri}: {_one_line(e)}", err=True)
            return False
        return True
    raise ClusterError(f"unknown action {action}")


# ------------------------------------------------------------------------------------- local cluster

STATE_FILE = "cluster.json"


def _state_dir(state_dir: str | Path | None) -> Path:
    return Path(state_dir or os.environ.get("MTORL_CLUSTER_DIR") or Path.home() / ".mtorl" / "cluster")


def _read_state(d: Path) -> dict[str, Any] | None:
    f = d / STATE_FILE
    return json.loads(f.read_text()) if f.exists() else None


def _node_cmd(ray_bin: str, head: bool, gcs: str, temp_dir: str, cpus: float, object_store_mb: int,
              dashboard_port: int | None = None) -> list[str]:
    cmd = [ray_bin, "start", "--block", "--disable-usage-stats", f"--num-cpus={cpus:g}",
           "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
           f"--object-store-memory={object_store_mb * 1024 * 1024}",
           # every port explicit (or random): several nodes, and maybe another Ray, share this machine
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
           "--min-worker-port=0", "--max-worker-port=0"]
    if head:
        cmd += ["--head", f"--port={gcs.rsplit(':', 1)[1]}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}"]
    else:
        cmd += [f"--address={gcs}"]
    return cmd


def _alive_nodes(dashboard: str) -> int:
    try:
        with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=1000&detail=false", timeout=5) as r:
            body = json.loads(r.read())
        rows = body["data"]["result"]["result"]
        return sum(1 for n in rows if n.get("state") == "ALIVE")
    except Exception:  # noqa: BLE001 - not up yet
        return 0


NODE_START_RETRIES = 2


SLOW_START_MARKS = (b"timed out during startup", b"Timed out while waiting for GCS to become available")


def _slow_start(log: Path) -> bool:
    """Ray's own start-up timeouts in a node's log: its fixed 30 s for a raylet to register, or for the
    GCS to answer (both run out on a busy machine)."""
    try:
        tail = log.read_bytes()[-20_000:]
    except OSError:
        return False
    return any(m in tail for m in SLOW_START_MARKS)


def local_cluster_up(workers: int, state_dir: str | Path | None = None, cpus_per_node: float = 1,
                     object_store_mb: int = 256, timeout_s: float = 120) -> dict[str, Any]:
    """Start a head and ``workers`` worker nodes on loopback, each ``ray start --block`` in its own
    process group with its own temp dir; PIDs go to ``<state_dir>/cluster.json``."""
    d = _state_dir(state_dir)
    if (old := _read_state(d)) and any(pid_alive(n["pid"]) for n in old["nodes"]):
        raise ClusterError(f"a local cluster is already running ({old['dashboard']}); run cluster/local/down.sh first")
    d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.setdefault("RAY_AUTH_MODE", "token")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # bare `python` = this venv
    ray_bin = str(Path(sys.executable).parent / "ray")
    if env["RAY_AUTH_MODE"] == "token":  # ray start refuses token mode without a token; never print it
        subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    state: dict[str, Any] = {"gcs": "", "dashboard": "", "auth_mode": env["RAY_AUTH_MODE"], "nodes": []}

    def new_head_ports() -> None:
        state["gcs"], state["dashboard"] = f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"

    def launch(role: str, head: bool) -> dict[str, Any]:
        tmp = tempfile.mkdtemp(prefix=f"mtorl-ray-{role}-", dir="/tmp")  # short: unix socket paths
        log = d / f"{role}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(_node_cmd(ray_bin, head, state["gcs"], tmp, cpus_per_node, object_store_mb,
                                              int(state["dashboard"].rsplit(":", 1)[1])),
                                    env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        node = {"role": role, "pid": proc.pid, "temp_dir": tmp, "log": str(log)}
        state["nodes"].append(node)
        (d / STATE_FILE).write_text(json.dumps(state, indent=2))
        return node

    def start(role: str, head: bool) -> None:
        """Launch one node and wait until the dashboard counts it. Ray gives a node a fixed 30 s to
        register with the GCS; on a busy machine that can run out, so such a node is started again."""
        end = time.time() + timeout_s
        for attempt in range(1 + NODE_START_RETRIES):
            if head:
                new_head_ports()
            node = launch(role, head)
            while _alive_nodes(state["dashboard"]) < len(state["nodes"]):
                if not pid_alive(node["pid"]):
                    if attempt < NODE_START_RETRIES and _slow_start(Path(node["log"])):
                        _signal_group(node["pid"], signal.SIGKILL)
                        shutil.rmtree(node["temp_dir"], ignore_errors=True)
                        state["nodes"].remove(node)
                        break
                    local_cluster_down(d)
                    raise ClusterError(f"local cluster: {role} exited (see {node['log']})")
                if time.time() > end:
                    local_cluster_down(d)
                    raise ClusterError(f"local cluster: {role} not up after {timeout_s:.0f} s")
                time.sleep(1.0)
            else:
                return

    start("head", True)
    for i in range(workers):
        start(f"worker{i + 1}", False)
    return state


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def local_cluster_down(state_dir: str | Path | None = None, grace_s: float = 5) -> int:
    """Stop the nodes recorded in the state file, workers first: SIGTERM to each ``ray start --block``
    process group, SIGKILL after ``grace_s``. Touches no other Ray on the machine. Returns nodes stopped."""
    d = _state_dir(state_dir)
    state = _read_state(d)
    if not state:
        return 0
    nodes = list(reversed(state["nodes"]))
    for n in nodes:
        _signal_group(n["pid"], signal.SIGTERM)
    end = time.time() + grace_s
    while time.time() < end and any(_group_alive(n["pid"]) for n in nodes):
        time.sleep(0.5)
    for n in nodes:
        _signal_group(n["pid"], signal.SIGKILL)
        shutil.rmtree(n["temp_dir"], ignore_errors=True)
    (d / STATE_FILE).unlink(missing_ok=True)
    return len(nodes)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # the node was started with start_new_session: its pid is the group id
    except (ProcessLookupError, PermissionError):
        pass


def iter_logs(state_dir: str | Path | None = None) -> Iterator[Path]:
    state = _read_state(_state_dir(state_dir)) or {"nodes": []}
    for n in state["nodes"]:
        yield Path(n["log"])


def local_cluster_status(state_dir: str | Path | None = None) -> tuple[dict[str, Any], int, list[str]] | None:
    """(state, nodes the dashboard reports alive, roles whose process is up), or None when no cluster is recorded."""
    st = _read_state(_state_dir(state_dir))
    if not st:
        return None
    return st, _alive_nodes(st["dashboard"]), [n["role"] for n in st["nodes"] if pid_alive(n["pid"])]


def state_file(state_dir: str | Path | None = None) -> Path:
    return _state_dir(state_dir) / STATE_FILE
