"""The proxy's replica-loss guard as a plain ASGI middleware (no Ray): what a client gets when the app it
wraps (Serve's proxy) ends a request without a response, or holds it while a replica is being replaced."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from mtorl.serving.proxy_guard import ENV, IMPORT_PATH, ReplicaLossGuard, controller_env, middlewares

SCOPE = {"type": "http", "method": "POST", "path": "/v1/recommend", "headers": []}


class Client:
    """One request's ASGI receive/send: the body, then (after the response, as uvicorn does) a disconnect."""

    def __init__(self, disconnect_after: float | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.done = asyncio.Event()
        self.disconnect_after = disconnect_after
        self._body_read = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_read:
            self._body_read = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        if self.disconnect_after is not None:
            await asyncio.sleep(self.disconnect_after)
        else:
            await self.done.wait()
        return {"type": "http.disconnect"}

    async def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)
        if msg["type"] == "http.response.body" and not msg.get("more_body"):
            self.done.set()

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)

    def header(self, name: bytes) -> bytes | None:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return dict(start["headers"]).get(name)


async def answers(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def ends_silently(scope: Any, receive: Any, send: Any) -> None:  # what the proxy does when the replica dies
    await receive()


def waits_for_a_replica(seen: list[str]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:  # routing with no replica: until a disconnect
        await receive()
        msg = await receive()
        seen.append(msg["type"])
    return app


def run(guard: ReplicaLossGuard, client: Client) -> None:
    asyncio.run(asyncio.wait_for(guard(dict(SCOPE), client.receive, client.send), 10))


def test_a_request_ended_without_a_response_is_503_with_retry_after() -> None:
    guard = ReplicaLossGuard(ends_silently)
    c = Client()
    run(guard, c)
    assert c.status == 503 and c.header(b"retry-after") == b"2"
    detail = json.loads(c.sent[-1]["body"])["detail"]
    assert detail.startswith("service: ") and "retry after 2 s" in detail
    assert guard.lost_at is not None and guard.answered == 1


def test_while_degraded_a_waiting_request_is_503_and_the_app_sees_a_disconnect() -> None:
    seen: list[str] = []
    guard = ReplicaLossGuard(waits_for_a_replica(seen), wait_s=0.3)
    guard.lost_at = 0.0  # a loss seen long ago, nothing answered since
    c = Client()
    run(guard, c)
    assert c.status == 503 and c.header(b"retry-after") == b"2"
    assert seen == ["http.disconnect"]  # the wrapped proxy winds the request down its own way


def test_an_answer_passes_through_and_ends_the_degraded_state() -> None:
    guard = ReplicaLossGuard(answers, wait_s=0.3)
    guard.lost_at = 0.0
    c = Client()
    run(guard, c)
    assert c.status == 200 and c.sent[-1]["body"] == b"ok" and guard.lost_at is None and guard.answered == 0


def test_healthy_requests_wait_as_long_as_the_app_takes() -> None:
    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.8)
        await answers(scope, receive, send)
    guard = ReplicaLossGuard(slow, wait_s=0.1)  # not degraded: the wait bound does not apply
    c = Client()
    run(guard, c)
    assert c.status == 200


def test_a_healthy_request_held_past_the_stall_bound_is_503_and_degrades() -> None:
    """A replica that died between requests: the router holds every request, none ends without a response."""
    seen: list[str] = []
    guard = ReplicaLossGuard(waits_for_a_replica(seen), wait_s=0.1, stall_s=0.4)
    c = Client()
    run(guard, c)
    assert c.status == 503 and c.header(b"retry-after") == b"2" and seen == ["http.disconnect"]
    assert guard.lost_at is not None and guard.answered == 1


def test_a_client_that_left_gets_nothing_and_degrades_nothing() -> None:
    async def sees_disconnect(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await receive()  # the disconnect; the proxy then ends the request without a response (its 499)
    guard = ReplicaLossGuard(sees_disconnect)
    c = Client(disconnect_after=0.05)
    run(guard, c)
    assert c.sent == [] and guard.lost_at is None


def test_non_http_scopes_are_passed_through() -> None:
    calls: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["type"])
    asyncio.run(ReplicaLossGuard(app)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert calls == ["lifespan"]


def test_the_proxy_callback_and_its_env(monkeypatch: Any) -> None:
    (mw,) = middlewares()
    assert mw.cls is ReplicaLossGuard
    monkeypatch.delenv(ENV, raising=False)
    assert controller_env() == {ENV: IMPORT_PATH}
    monkeypatch.setenv(ENV, "ops.custom:callback")  # an operator's own callback is kept
    assert controller_env() == {}
