"""The Serve config for a KubeRay RayService (``mtorl serve SPEC --for rayservice --config-out FILE``).

A RayService's ``serveConfigV2`` is served behind KubeRay's Kubernetes Services, which route to the container
port named ``serve`` (8000 by default) and probe every worker pod's Serve proxy there
(``wget .../-/healthz``). So the config KubeRay can serve differs from a local one:

* ``http_options.host`` is ``0.0.0.0`` (a Service cannot reach a proxy on loopback), so the bearer token is
  required (``auth_token_env``, default ``MTORL_SERVE_TOKEN``, the variable the manifests set from a Secret);
* ``ingress`` is ``proxy`` or ``haproxy`` (``direct`` moves Serve's proxy off KubeRay's serve port and probe).
  With ``haproxy`` HAProxy takes the serve port on every node and routes to the replicas' own HTTP servers;
  its switches go in ``controller_options`` (the Serve controller, which the dashboard starts from this config,
  and the HAProxy managers it starts inherit them) and in the replicas' ``runtime_env``, with
  ``RAY_SERVE_HAPROXY_BINARY_PATH`` the image's ``mtorl-haproxy`` shim (stats and metrics on loopback);
* ``checkpoint`` is one checkpoint URI, never a run directory: every replica, including replicas started
  later by autoscaling or after a failure, serves the same model until the config is changed.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import ValidationError

from mtorl.spec import ServeJob, ServeSpec, SpecError

KUBERAY_SERVE_PORT = 8000  # KubeRay's DefaultServingPort: the container port named "serve"
IMAGE_HAPROXY_SHIM = "/usr/local/bin/mtorl-haproxy"  # the Dockerfile's `pip install .` (python image) puts it there
DEFAULT_TOKEN_ENV = "MTORL_SERVE_TOKEN"
CHECKPOINT_PREFIX = "checkpoint_"  # the last path segment of a checkpoint dir (Ray Train's and in-process runs')


def is_pinned(checkpoint: str) -> bool:
    """A checkpoint directory's URI (``.../checkpoint_*``), not a run directory that resolves to its best."""
    return checkpoint.rstrip("/").rsplit("/", 1)[-1].startswith(CHECKPOINT_PREFIX)


def rayservice_args(spec: ServeSpec, checkpoint: str | None = None, pinned: bool = True) -> Any:
    """ServeSpec -> the ``ServeArgs`` of a RayService (host 0.0.0.0, port 8000, proxy or haproxy ingress, token on).

    Raises ValueError naming the field when the spec can't be served by KubeRay as it is."""
    from mtorl.serving.app import ServeArgs, spec_args

    if spec.ingress == "direct":
        raise ValueError("ingress: a RayService needs ingress 'proxy' or 'haproxy' (with 'direct' Serve's proxy leaves "
                         "KubeRay's serve port and readiness probe)")
    args = {**spec_args(spec), "host": "0.0.0.0", "port": KUBERAY_SERVE_PORT,
            "auth_token_env": spec.auth_token_env or DEFAULT_TOKEN_ENV}
    if checkpoint is not None:
        args["checkpoint"] = checkpoint
    if pinned and not is_pinned(args["checkpoint"]):
        raise ValueError(f"checkpoint: {args['checkpoint']} is not a checkpoint directory (.../{CHECKPOINT_PREFIX}*): "
                         "a RayService pins one checkpoint (`mtorl serve SPEC --for rayservice` resolves a run "
                         "to its best)")
    return ServeArgs.model_validate(args)


def rayservice_config(spec: ServeSpec, checkpoint: str | None = None) -> dict[str, Any]:
    """The ``serveConfigV2`` document (a dict) for ``spec``: Serve's proxy on every node at 0.0.0.0:8000."""
    from mtorl.serving.app import haproxy_env, serve_config

    args = rayservice_args(spec, checkpoint)
    # ingress 'haproxy': Ray's default paths (/tmp/haproxy-serve, one Serve per pod) and ports, the image's shim
    config = serve_config(args, haproxy_env(IMAGE_HAPROXY_SHIM) if args.ingress == "haproxy" else None)
    return {"proxy_location": "EveryNode", **config}


def rayservice_config_yaml(spec: ServeSpec, checkpoint: str | None = None) -> str:
    import yaml

    return yaml.safe_dump(rayservice_config(spec, checkpoint), sort_keys=False)


def write_rayservice_config(job: ServeJob, out: str, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Resolve the spec's checkpoint (a run resolves to its best checkpoint, checked as ``mtorl serve`` does)
    and write the RayService Serve config to ``out``. Deploys nothing."""
    from mtorl import storage
    from mtorl.training.checkpoint import load_checkpoint

    try:
        rayservice_args(job.spec, pinned=False)
    except (ValueError, ValidationError) as e:  # the spec's own problems, before any storage access
        msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        field, _, reason = msg.removeprefix("Value error, ").partition(": ")
        raise SpecError("<ServeJob>", [(f"spec.{field}", reason or msg)]) from None
    loaded = load_checkpoint(job.spec.checkpoint)  # checksums and version, as a replica would check them
    text = ("# Ray Serve config for a KubeRay RayService (written by `mtorl serve --for rayservice`).\n"
            f"# The checkpoint is pinned: {loaded.uri}\n"
            "# Use it as spec.serveConfigV2 (a string), or render the manifests with CHECKPOINT=<that URI>.\n"
            + rayservice_config_yaml(job.spec, checkpoint=loaded.uri))
    storage.write_bytes(out, text.encode())
    progress(f"[serve] RayService Serve config written to {out} (checkpoint {loaded.uri})")
    return {"config_out": out, "checkpoint": loaded.uri, "serve_config": rayservice_config(job.spec, loaded.uri)}
