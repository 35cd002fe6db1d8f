"""The Ray Serve application: channel recommendation and budget allocation over HTTP.

Import path for Serve configs (``serve run`` / ``serve deploy`` / KubeRay ``serveConfigV2``)::

    applications:
    - name: mtorl
      route_prefix: /
      import_path: mtorl.serving.app:build_app
      args: {checkpoint: s3://bucket/runs/name, ...}     # the ServeSpec fields (ServeArgs)

``mtorl serve SPEC --config-out serve.yaml`` writes such a file. Endpoints (FastAPI, docs at ``/docs``):

* ``POST /v1/recommend``  users' journeys -> channel probabilities, predicted rewards, recommended channel
* ``POST /v1/allocate``   the same users + a budget -> the users to target, within budget
  (``mtorl.evaluation.allocation.allocate_requests``, the offline evaluation's code)
* ``GET /v1/model``       checkpoint version, training spec and metrics, data manifest summary
* ``GET /healthz``        liveness (never needs the token)

Bad input is a 4xx whose ``detail`` names the field (``users[0].journey[3].features.foo: ...``);
request parsing and checks are in ``mtorl.serving.schemas``. When ``auth_token_env`` is set, ``/v1/*``
need ``Authorization: Bearer <token>``; it is required whenever ``host`` is not a loopback address.
The replica reads the token from its own environment (deployed from a config file: set the variable on
the cluster's nodes, e.g. from a Kubernetes Secret); ``mtorl serve`` passes its replicas only the
token's SHA-256 digest. The token is never logged.
"""

# No ``from __future__ import annotations`` here: Ray Serve reads the builder's parameter annotation
# (a class, not a string) to validate the config's ``args`` into ``ServeArgs``.

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError, model_validator
from ray import serve
from ray.serve import Application

import mtorl
from mtorl.serving.schemas import (
    AllocateRequest, AllocateResponse, Limits, Preprocessor, RecommendRequest, RecommendResponse, RequestError,
)
from mtorl.serving.service import Answer, Job, Service, is_loopback, sample_user, token_digest
from mtorl.spec import ServeJob, ServeSpec, SpecError

IMPORT_PATH = "mtorl.serving.app:build_app"
DEPLOYMENT_NAME = "MtorlPredictor"


class ServeArgs(ServeSpec):
    """The ``args`` of the Serve application: the ServeSpec fields, validated by Serve (typed builder)."""

    @model_validator(mode="after")
    def _auth_off_loopback(self) -> "ServeArgs":
        if not is_loopback(self.host) and not self.auth_token_env:
            raise ValueError(f"host {self.host!r} is not a loopback address: set auth_token_env "
                             "(the env var holding the bearer token) to expose the endpoints")
        return self


# ------------------------------------------------------------------------------------------ FastAPI ingress

api = FastAPI(
    title="mtorl",
    version=mtorl.__version__,
    description="Budget-aware channel recommendation (multi-task offline RL). Bad input is a 4xx naming the "
                "field; /v1/* need `Authorization: Bearer <token>` when the server has a token.",
)
_BODIES = {"recommend": RecommendRequest, "allocate": AllocateRequest}


def _openapi() -> dict[str, Any]:
    """The request bodies are read by hand (size limit, one-line errors): add their schemas to the docs."""
    if api.openapi_schema:
        return api.openapi_schema
    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in _BODIES.values():
        s = model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(s.pop("$defs", {}))
        comps[model.__name__] = s
    api.openapi_schema = schema
    return schema


api.openapi = _openapi  # type: ignore[method-assign]


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "body is not JSON"}, 401: {"description": "missing or wrong token"},
    413: {"description": "body too large"}, 415: {"description": "Content-Type is not application/json"},
    422: {"description": "bad input (detail names the field)"}}


def _body_doc(name: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{_BODIES[name].__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _error(e: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse({"detail": e.detail}, status_code=e.status, headers=headers)


# health_check_period_s: how soon the controller sees a crashed replica and starts its replacement (it
# noticed a SIGKILLed one 7 s late with 10 s); a check is one cheap actor call.
@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=2, health_check_timeout_s=30,
                  graceful_shutdown_wait_loop_s=1, graceful_shutdown_timeout_s=30)
@serve.ingress(api)
class MtorlPredictor:
    """One replica: a ``Predictor`` loaded from object storage behind ``mtorl.serving.service.Service`` (the
    request checks, preprocessing and response code the plain reference server runs too)."""

    def __init__(self, args: dict[str, Any], digest: Optional[str] = None):
        from mtorl.serving.predictor import Predictor

        self.args = ServeArgs.model_validate(args)
        if digest is None and self.args.auth_token_env:
            token = os.environ.get(self.args.auth_token_env)
            if not token:
                raise RuntimeError(f"auth_token_env: environment variable {self.args.auth_token_env} is not set "
                                   "on this replica's node; refusing to serve without the token")
            digest = token_digest(token)
        if digest is None and not is_loopback(self.args.host):
            raise RuntimeError(f"host {self.args.host!r} is not loopback and no token is configured")
        threads = max(1, int(round(self.args.num_cpus_per_replica)))
        # a replica given GPUs (num_gpus_per_replica) runs its forward there; the checkpoint is device-free
        device = "cuda" if self.args.num_gpus_per_replica > 0 else "cpu"
        self.predictor = Predictor.from_checkpoint(self.args.checkpoint, device=device)
        import torch

        torch.set_num_threads(threads)
        self.service = Service(self.predictor, Limits(self.args.max_users_per_request, self.args.max_journey_length),
                               self.args.max_body_bytes, digest)
        self.pre, self.version = self.service.pre, self.service.version
        self._forward.set_max_batch_size(self.args.max_batch_size)
        self._forward.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        # One request's whole path on a made-up user before the replica reports ready: lazy imports and
        # first-call set-up happen here rather than in a client's request, and before Serve freezes the
        # start-up objects out of the garbage collector's scans (objects created after that freeze made
        # every full collection a ~35 ms pause in the request path).
        self.service.warm_up()

    def check_health(self) -> None:
        if self.predictor is None or self.pre is None:
            raise RuntimeError("model not loaded")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _forward(self, jobs: list[Job]) -> list[Answer]:
        """One model forward, one channel scoring and every response body for many concurrent requests
        (dynamic batching), in a worker thread; each request gets its own body or its own error."""
        return await asyncio.to_thread(self.service.run_batch, jobs)

    async def _handle(self, request: Request, kind: str) -> Response:
        svc = self.service
        try:
            svc.authorize(request.headers)
            job = svc.parse(kind, await svc.read_body(request.headers, request.stream))  # alone, before any batch
        except RequestError as e:
            return _error(e)
        answer = await self._forward(job)
        if isinstance(answer, RequestError):
            return _error(answer)
        return Response(answer, media_type="application/json")

    # -- endpoints
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model_version": self.version}

    @api.post("/v1/recommend", response_model=RecommendResponse, openapi_extra=_body_doc("recommend"),
              responses=_ERRORS)
    async def recommend(self, request: Request) -> Response:
        """Next-channel recommendation for each user."""
        # The body is sent as built (the fields of RecommendResponse): the model documents the response, and
        # the integration tests validate responses against it.
        return await self._handle(request, "recommend")

    @api.post("/v1/allocate", response_model=AllocateResponse, openapi_extra=_body_doc("allocate"),
              responses=_ERRORS)
    async def allocate(self, request: Request) -> Response:
        """Which users to target, and on which channel, within a budget (spend <= budget)."""
        return await self._handle(request, "allocate")

    @api.get("/v1/model")
    async def model(self, request: Request) -> Any:
        """Checkpoint version, training spec and metrics, data manifest summary."""
        try:
            self.service.authorize(request.headers)
        except RequestError as e:
            return _error(e)
        meta, man = self.predictor.meta, self.predictor.manifest
        return {
            "model_version": self.version,
            "checkpoint": self.predictor.uri,
            "model": self.predictor.name,
            "mtorl_version": meta.mtorl_version,
            "epoch": meta.epoch,
            "step": meta.step,
            "spec": meta.spec,
            "metrics": meta.metrics,
            "data": {
                **man.model_dump(mode="json", include={"version", "source", "created_at", "channels", "step_features",
                                                       "user_features", "categorical", "gain", "gain_binary", "cost",
                                                       "penalty"}),
                "splits": {s: {"users": v.users, "steps": v.steps} for s, v in man.splits.items()},
            },
            "decision": self.service.decision.model_dump(),  # the decision layer recommend/allocate act by
            # an ensemble's members and the decision fields `mtorl ensemble --decision` set; None: a single model
            "ensemble": meta.ensemble.model_dump(mode="json") if meta.ensemble is not None else None,
            "serving": {k: getattr(self.args, k) for k in ("max_batch_size", "batch_wait_timeout_s", "max_ongoing_requests",
                                                           "max_journey_length", "max_users_per_request", "max_body_bytes")},
            "stats": dict(self.service.stats),
        }


# ------------------------------------------------------------------------------------------ builder

def direct_ingress_env(port: int) -> dict[str, str]:
    """Ray Serve's direct-ingress switches for ``ingress: direct``: the ingress replica runs its own HTTP
    server on exactly ``port`` (host from the http options), so requests skip the proxy actor and the
    replica's actor-call path. The controller and the replica must both see them (controller_options and
    the deployment's runtime_env). No external load balancer drains it, so the drain wait is 1 s."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port), "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            "RAY_SERVE_DIRECT_INGRESS_PORT_RETRY_COUNT": "3", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


HAPROXY_SHIM = "mtorl-haproxy"  # the console script of mtorl.serving.haproxy_loopback
HAPROXY_MAX_SOCKET_PATH = 97  # HAProxy 2.8: "socket path ... too long (max 97)"


def haproxy_env(binary: Optional[str] = None, workdir: Optional[str] = None,
                ports: Optional[tuple[int, int, int, int]] = None) -> dict[str, str]:
    """Ray Serve's HAProxy-ingress switches for ``ingress: haproxy``: HAProxy listens on ``port`` (host from the
    http options) and routes to each ingress replica's own HTTP server (direct ingress, which HAProxy mode
    implies), with the throughput-optimized settings. The replicas need the first three; the rest are for the
    Serve controller and the HAProxy manager it starts (they inherit its env):

    * ``binary``: ``RAY_SERVE_HAPROXY_BINARY_PATH``, the ``mtorl-haproxy`` shim that rebinds HAProxy's stats
      and Prometheus listeners to 127.0.0.1 (``mtorl.serving.haproxy_loopback``);
    * ``workdir``: where HAProxy's config, admin socket and state files go (Ray's default is a fixed
      ``/tmp/haproxy-serve``, which two Serve instances on one machine would share);
    * ``ports``: the (stats, metrics) ports, loopback-only, and the (HTTP, gRPC) ports of the fallback proxy
      (Serve's Python proxy on the head node, HAProxy's backup server; on ``http_options.host``), instead of
      Ray's fixed defaults 8404, 9101, 8500 and 9500.

    A replica being replaced keeps answering for 2 s after HAProxy was told it goes (Ray's default is 30 s,
    for load balancers outside the cluster; HAProxy is reloaded within about 0.1 s and retries refused
    connections). None of these is a secret."""
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    if binary:
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = binary
    if workdir:
        env.update({"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{workdir}/haproxy.cfg",
                    "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{workdir}/admin.sock",
                    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": workdir,
                    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{workdir}/server-state",
                    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{workdir}/metrics.sock"})
    if ports:
        env.update({"RAY_SERVE_HAPROXY_STATS_PORT": str(ports[0]), "RAY_SERVE_HAPROXY_METRICS_PORT": str(ports[1]),
                    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(ports[2]),
                    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(ports[3])})
    return env


def haproxy_shim() -> str:
    """Absolute path of the ``mtorl-haproxy`` console script: next to this interpreter, else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), HAPROXY_SHIM)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    found = shutil.which(HAPROXY_SHIM)
    if found:
        return os.path.abspath(found)
    raise RuntimeError(f"ingress 'haproxy': the {HAPROXY_SHIM} command (installed with mtorl) is not found next to "
                       f"{sys.executable} or on PATH: reinstall mtorl (pip install -e . / make install)")


def haproxy_local_env() -> dict[str, str]:
    """``haproxy_env`` for a Serve started here (``mtorl serve``): the shim, a fresh private folder (0700: it
    holds HAProxy's admin socket) and free ports. HAProxy refuses unix socket paths over 97 bytes and Serve
    puts a 56-character node id in them, so a long TMPDIR falls back to /tmp. The controller waits up to 30 s (Ray:
    5 s) for the HAProxy manager and the fallback proxy to report ready: both start at once, and on a busy
    2-core machine their worker processes took longer than 5 s, three times in a row, which had the
    controller kill and restart them."""
    from mtorl.localhost import free_ports

    base = tempfile.gettempdir()
    if len(base) + len("/hap-12345678/") + 56 + len("/metrics.sock") > HAPROXY_MAX_SOCKET_PATH:
        base = "/tmp"
    workdir = tempfile.mkdtemp(prefix="hap-", dir=base)
    stats, metrics, http, grpc = free_ports(4)
    return {**haproxy_env(haproxy_shim(), workdir, (stats, metrics, http, grpc)),
            "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}


def proxy_port(args: ServeArgs) -> int:
    """The port of Serve's own HTTP proxy: ``port`` itself (``proxy``; ``haproxy``, where HAProxy takes its
    place), or with ``ingress: direct`` (where the replica takes ``port``) the next one, which nothing is
    routed through."""
    return args.port if args.ingress != "direct" else (args.port + 1 if args.port < 65535 else args.port - 1)


# Replica settings (no secrets: Ray logs runtime_env env_vars). Serve's own log lines, the access log
# included, still go to the replica's log file; only the copy on stderr, which Ray streams to the driver's
# stdout line by line, is dropped.
REPLICA_ENV = {"RAY_SERVE_LOG_TO_STDERR": "0"}


def serve_env(args: ServeArgs) -> dict[str, str]:
    """The Serve switches of ``args`` for the controller and the replicas (none is a secret). Ray Serve's
    throughput-optimized mode without its direct ingress (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``,
    ``RAY_SERVE_ENABLE_DIRECT_INGRESS=0``) was measured for ``ingress: proxy`` and lost (BENCHMARKS.md)."""
    if args.ingress == "direct":
        return direct_ingress_env(args.port)
    return haproxy_env() if args.ingress == "haproxy" else {}


def controller_env(args: ServeArgs, local: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The Serve controller's env vars (its proxies inherit them): the replica-loss guard of
    ``mtorl.serving.proxy_guard`` (a lost replica is a 503 with Retry-After; Serve's Python proxy only, so
    not with ``haproxy``) plus ``serve_env(args)`` and ``local`` (``haproxy_local_env()``: this machine's
    paths and ports)."""
    from mtorl.serving.proxy_guard import controller_env as guard_env

    return {**(guard_env() if args.ingress == "proxy" else {}), **serve_env(args), **(local or {})}


def _bind(args: ServeArgs, digest: Optional[str] = None) -> Application:
    env = {**REPLICA_ENV, **serve_env(args)}
    actor: dict[str, Any] = {"num_cpus": args.num_cpus_per_replica, "num_gpus": args.num_gpus_per_replica,
                             "runtime_env": {"env_vars": env}}
    dep = MtorlPredictor.options(
        ray_actor_options=actor,
        max_surge_percent=0 if args.ingress == "direct" else args.max_surge_percent,
        max_ongoing_requests=args.max_ongoing_requests,
        logging_config={"enable_access_log": args.access_log, "log_level": args.log_level},
        autoscaling_config={
            "min_replicas": args.autoscaling.min_replicas,
            "max_replicas": args.autoscaling.max_replicas,
            "target_ongoing_requests": args.autoscaling.target_ongoing_requests,
        },
    )
    return dep.bind(args.model_dump(), digest)


def build_app(args: ServeArgs) -> Application:
    """Typed application builder (``import_path: mtorl.serving.app:build_app``); Serve validates the
    config's ``args`` into ``ServeArgs``. The replica reads the token from ``auth_token_env`` itself."""
    if not isinstance(args, ServeArgs):  # called by hand with a dict
        args = ServeArgs.model_validate(args)
    return _bind(args)


def spec_args(spec: ServeSpec) -> dict[str, Any]:
    """ServeSpec -> the application's ``args`` (every field but runPolicy)."""
    return spec.model_dump(mode="json", exclude={"run_policy"})


def serve_config(args: ServeArgs, local: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """A Serve config (``serve deploy`` / ``serve run`` / KubeRay RayService ``serveConfigV2``); ``local``:
    extra controller env of a Serve started here (``haproxy_local_env``)."""
    config: dict[str, Any] = {
        "http_options": {"host": args.host, "port": proxy_port(args), "request_timeout_s": args.request_timeout_s}}
    env = controller_env(args, local)
    if env:
        config["controller_options"] = {"runtime_env": {"env_vars": env}}
    return {
        **config,
        "applications": [{
            "name": args.app_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": spec_args(args),
        }],
    }


def serve_config_yaml(args: ServeArgs, local: Optional[dict[str, str]] = None) -> str:
    import yaml

    head = ("# Ray Serve config for mtorl (written by `mtorl serve --config-out`).\n"
            "# Run: serve deploy THIS_FILE (needs the Ray dashboard), or serve run THIS_FILE;\n"
            "# Not for a KubeRay RayService: `mtorl serve SPEC --for rayservice --config-out F` writes that one.\n")
    if args.auth_token_env:
        head += f"# The replicas read the bearer token from the environment variable {args.auth_token_env}.\n"
    return head + yaml.safe_dump(serve_config(args, local), sort_keys=False)


def _examples(url: str, pre: Preprocessor, auth_env: Optional[str]) -> list[str]:
    user = sample_user(pre, "u1")
    auth = f" -H \"Authorization: Bearer ${auth_env}\"" if auth_env else ""
    rec = json.dumps({"users": [user]})
    alloc = json.dumps({"users": [user], "budget": 10.0})
    return [f"curl -s {url}/healthz",
            f"curl -s{auth} {url}/v1/model",
            f"curl -s{auth} -H 'Content-Type: application/json' -d '{rec}' {url}/v1/recommend",
            f"curl -s{auth} -H 'Content-Type: application/json' -d '{alloc}' {url}/v1/allocate"]


def run_serve(job: ServeJob, address: Optional[str] = None, config_out: Optional[str] = None, blocking: bool = True,
              progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Deploy the application on Ray Serve (``mtorl serve``); block until Ctrl-C when ``blocking``.

    Returns {url, docs, app_name, checkpoint (resolved), model_version, serve_config (dict), config_out}.
    """
    from mtorl.training.checkpoint import load_checkpoint

    try:
        args = ServeArgs.model_validate(spec_args(job.spec))
    except ValidationError as e:
        raise SpecError("<ServeJob>", [("spec." + ".".join(str(x) for x in err["loc"]) if err["loc"] else "spec.host",
                                        err["msg"].removeprefix("Value error, ")) for err in e.errors()]) from None
    digest = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env)
        if not token:
            raise SpecError("<ServeJob>", [("spec.auth_token_env",
                                            f"environment variable {args.auth_token_env} is not set (or empty)")])
        digest = token_digest(token)
    loaded = load_checkpoint(args.checkpoint)  # fail fast here (checksum, version) rather than in a replica
    args = ServeArgs.model_validate({**spec_args(args), "checkpoint": loaded.uri})  # pin a run dir to its best checkpoint
    from mtorl.raycluster import init_ray

    init_ray(address, secret_env=(args.auth_token_env,) if args.auth_token_env else ())  # never in a runtime_env
    # HAProxy's folder and ports for a new controller (a running one keeps its own: an update of the app)
    local = haproxy_local_env() if args.ingress == "haproxy" and not _controller_running() else None
    config = serve_config(args, local)
    if config_out:
        from mtorl import storage

        storage.write_bytes(config_out, serve_config_yaml(args, local).encode())
        progress(f"[serve] Serve config written to {config_out} (serve deploy / KubeRay serveConfigV2)")
    from mtorl.raycluster import check_resources

    check_resources({"CPU": args.num_cpus_per_replica}, max(1, args.autoscaling.min_replicas),
                    f"num_cpus_per_replica={args.num_cpus_per_replica:g} x {max(1, args.autoscaling.min_replicas)} replica(s)")
    serve.start(**{k: config[k] for k in ("http_options", "controller_options") if k in config})
    t0 = time.time()
    progress(f"[serve] deploying {args.app_name} from {loaded.uri} ({args.ingress} ingress) ...")
    serve.run(_bind(args, digest), name=args.app_name, route_prefix="/")
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}"
    if args.ingress != "proxy":
        _await_direct_ingress(url, args.request_timeout_s, args.ingress)
    pre = Preprocessor(loaded.manifest)
    progress(f"[serve] {args.app_name} is up at {url} ({time.time() - t0:.1f}s); API docs: {url}/docs")
    for line in _examples(url, pre, args.auth_token_env):
        progress(f"  {line}")
    result = {"url": url, "docs": f"{url}/docs", "app_name": args.app_name, "checkpoint": loaded.uri,
              "model_version": loaded.meta.sha256.get("model.safetensors", "")[:12],
              "serve_config": config, "config_out": config_out}
    if blocking:
        _block_until_interrupted(progress)
    return result


def _controller_running() -> bool:
    """Whether this Ray cluster has a Serve controller already (``serve.start`` then keeps its options)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _await_direct_ingress(url: str, timeout_s: float, ingress: str = "direct") -> None:
    """With ``ingress: direct`` the replica itself (``haproxy``: HAProxy) must answer on ``port``; Serve ignores
    the switches when a controller was already running on the cluster without them, so say so instead of
    serving nothing."""
    import httpx

    deadline = time.time() + max(30.0, timeout_s)
    last = ""
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5.0).status_code == 200:
                return
            last = "healthz did not answer 200"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.5)
    raise RuntimeError(f"ingress '{ingress}': nothing answers at {url} ({last}). Serve keeps the options of a controller "
                       "that is already running: stop it first (serve shutdown), or use ingress 'proxy'")


def _block_until_interrupted(progress: Callable[[str], None]) -> None:
    """Serve until Ctrl-C (or SIGTERM), then shut Serve down."""
    old = None
    if threading.current_thread() is threading.main_thread():
        def _term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt
        old = signal.signal(signal.SIGTERM, _term)
    progress("[serve] serving; Ctrl-C to stop")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        progress("[serve] stopping")
    finally:
        serve.shutdown()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
