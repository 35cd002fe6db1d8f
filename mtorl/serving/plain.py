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

from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from mtorl.serving.schemas import Limits, RequestError
from mtorl.serving.service import Answer, Job, MicroBatcher, Service


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


def run_plain_server(checkpoint: str, host: str = "127.0.0.1", port: int = 8100, max_batch_size: int = 32,
                     batch_wait_timeout_s: float = 0.005, max_body_bytes: int = 4_000_000,
                     token_sha256: Optional[str] = None) -> None:
    """Serve ``checkpoint`` until interrupted (``token_sha256``: the bearer token's digest, if any)."""
    import torch
    import uvicorn

    from mtorl.serving.predictor import Predictor

    torch.set_num_threads(1)
    service = Service(Predictor.from_checkpoint(checkpoint), Limits(), max_body_bytes, token_sha256)
    service.warm_up()
    app = build_plain_app(service, max_batch_size, batch_wait_timeout_s)
    uvicorn.run(app, host=host, port=port, workers=1, loop="uvloop", http="httptools", access_log=False,
                log_level="warning")


if __name__ == "__main__":
    from mtorl.cli import plain_server_main

    raise SystemExit(plain_server_main())
