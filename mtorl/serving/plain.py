"""A plain single-process server for the same endpoints, without Ray: the bench's reference for Ray Serve.

The same ``Predictor``, request checks, preprocessing, batching policy (up to ``max_batch_size`` requests
gathered for ``batch_wait_timeout_s``) and response code as the Serve deployment (``mtorl.serving.service``),
behind a FastAPI app on one uvicorn worker (uvloop, httptools), 1 torch thread (a replica's CPU share).
No autoscaling, no rolling update, no auth beyond the same bearer-token check; it is what a user would
build instead, which makes it the honest peer for Serve's overhead::

    python -m mtorl.serving.plain --checkpoint s3://bucket/runs/name --port 8100

Nothing runs at import time.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from mtorl.serving.schemas import Limits, RequestError
from mtorl.serving.service import Answer, Job, MicroBatcher, Service, is_loopback, token_digest


def _error(e: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse({"detail": e.detail}, status_code=e.status, headers=headers)


def build_plain_app(service: Service, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005) -> FastAPI:
    app = FastAPI(title="mtorl (plain reference server)")
    batcher: MicroBatcher[Job, Answer] = MicroBatcher(service.run_batch, max_batch_size, batch_wait_timeout_s)

    async def handle(request: Request, kind: str) -> Response:
        try:
            service.authorize(request.headers)
            job = service.parse(kind, await service.read_body(request.headers, request.stream))
        except RequestError as e:
            return _error(e)
        answer = await batcher(job)
        if isinstance(answer, RequestError):
            return _error(answer)
        return Response(answer, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model_version": service.version}

    @app.post("/v1/recommend")
    async def recommend(request: Request) -> Response:
        return await handle(request, "recommend")

    @app.post("/v1/allocate")
    async def allocate(request: Request) -> Response:
        return await handle(request, "allocate")

    return app


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mtorl.serving.plain", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-timeout-s", type=float, default=0.005)
    ap.add_argument("--max-body-bytes", type=int, default=4_000_000)
    ap.add_argument("--auth-token-env", help="env var holding the bearer token (required off loopback)")
    a = ap.parse_args(argv)
    import torch
    import uvicorn

    from mtorl.serving.predictor import Predictor

    digest = None
    if a.auth_token_env:
        token = os.environ.get(a.auth_token_env)
        if not token:
            ap.error(f"--auth-token-env: environment variable {a.auth_token_env} is not set")
        digest = token_digest(token)
    elif not is_loopback(a.host):
        ap.error(f"--host {a.host}: not a loopback address; set --auth-token-env")
    torch.set_num_threads(1)
    service = Service(Predictor.from_checkpoint(a.checkpoint), Limits(), a.max_body_bytes, digest)
    service.warm_up()
    app = build_plain_app(service, a.max_batch_size, a.batch_wait_timeout_s)
    uvicorn.run(app, host=a.host, port=a.port, workers=1, loop="uvloop", http="httptools", access_log=False,
                log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
