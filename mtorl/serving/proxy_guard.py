"""An ASGI middleware for Ray Serve's HTTP proxy: a lost replica is a 503 with ``Retry-After``, fast.

Ray Serve 2.60's proxy answers a request whose replica dies mid-request with nothing at all (the
``RayActorError`` maps to a 500 that ``send_http_response_on_exception`` never sends), so uvicorn's bare
``500 Internal Server Error`` reaches the client; and requests it holds while the deployment has no live
replica wait in the router until a new one is up (seconds: the controller notices at its next health check,
then the new replica loads its model), past ``request_timeout_s`` on a busy machine (408).

``ReplicaLossGuard`` wraps the proxy's ASGI app (Serve's ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
hook, set to ``mtorl.serving.proxy_guard:middlewares`` for the controller, whose proxies inherit it):

* a request the proxy ends without any response, while the client is still connected, gets
  ``503 {"detail": "service: ..."}`` with ``Retry-After``, and the guard marks the service *degraded*;
* while degraded, a request without a response start ``wait_s`` after it began (or after the loss was
  seen, whichever is later) is cancelled in the proxy and answered the same way, instead of waiting out
  the timeout for a replica that is still loading;
* a request without a response start ``stall_s`` after it began is answered the same way and marks the
  service degraded: when a replica dies between requests, none ends without a response (the router holds
  them all until the replacement is up), so a stall is the only sign the proxy gets;
* the first response below 500 ends the degraded state.

Responses the app or the proxy sent themselves (200, 4xx, the proxy's 408) pass through untouched.
Imports only the standard library: it runs inside Serve's proxy actor.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Awaitable, Callable, MutableMapping, Optional

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

IMPORT_PATH = "mtorl.serving.proxy_guard:middlewares"
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # Serve's proxy calls this function for its middlewares
RETRY_AFTER_S = 2      # the Retry-After a client gets (whole seconds, RFC 9110)
DEGRADED_WAIT_S = 2.0  # while degraded: longest wait for a response start before the 503
STALL_S = 5.0          # healthy: longest wait for a response start before the 503 (MTORL_SERVE_STALL_S)
_CHECK_S = 0.25        # how often a waiting request looks at the degraded state


class ReplicaLossGuard:
    """See the module docstring. ``app``: the proxy's ASGI app."""

    def __init__(self, app: ASGIApp, retry_after_s: int = RETRY_AFTER_S, wait_s: float = DEGRADED_WAIT_S,
                 stall_s: float | None = None):
        self.app, self.retry_after_s, self.wait_s = app, retry_after_s, wait_s
        self.stall_s = float(os.environ.get("MTORL_SERVE_STALL_S", STALL_S)) if stall_s is None else stall_s
        self.lost_at: Optional[float] = None  # monotonic time a replica loss was seen; None = healthy
        self.answered = 0                     # 503s this guard sent (for tests and logs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        started = answered = disconnected = False

        async def receive_() -> Message:
            nonlocal disconnected
            msg = await receive()
            if msg.get("type") == "http.disconnect":
                disconnected = True
            return msg

        async def send_(msg: Message) -> None:
            nonlocal started
            if answered:  # the guard answered this request already: the proxy's late messages are dropped
                return
            if msg.get("type") == "http.response.start":
                started = True
                if int(msg.get("status", 500)) < 500:
                    self.lost_at = None
            await send(msg)

        task = asyncio.ensure_future(self.app(scope, receive_, send_))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=_CHECK_S)
                if started:
                    await task
                    return
                lost, now = self.lost_at, time.monotonic()
                stalled = now - t0 >= self.stall_s
                if not task.done() and (stalled or (lost is not None and now - max(t0, lost) >= self.wait_s)):
                    answered = True
                    if self.lost_at is None:
                        self.lost_at = now
                    await self._unavailable(send, "no replica answered in time (a replica was lost and is being "
                                                  "replaced)")
                    # The server reports the finished response to the proxy as a disconnect, and the proxy
                    # cancels the request its own way; cancelling it from here is the fallback.
                    await asyncio.wait({task}, timeout=10.0)
                    if not task.done():
                        task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    return
        except asyncio.CancelledError:
            task.cancel()
            raise
        failed = task.exception()
        if started or disconnected:
            if failed is not None:
                raise failed
            return
        self.lost_at = time.monotonic()
        await self._unavailable(send, "the replica serving this request stopped before answering")

    async def _unavailable(self, send: Send, reason: str) -> None:
        self.answered += 1
        body = json.dumps({"detail": f"service: {reason}; retry after {self.retry_after_s} s"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(self.retry_after_s).encode())]})
        await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Any]:
    """The proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): Starlette middlewares to add."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLossGuard)]


def controller_env() -> dict[str, str]:
    """The env var that installs the guard in every Serve proxy (give it to the Serve controller; it is not
    a secret). An operator's own callback, already set in this environment, is left in place."""
    if os.environ.get(ENV) and os.environ[ENV] != IMPORT_PATH:
        return {}
    return {ENV: IMPORT_PATH}
