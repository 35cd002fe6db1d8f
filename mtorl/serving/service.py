"""The request path of the HTTP endpoints, without Ray: the Serve deployment and the plain reference server
(``mtorl.serving.plain``) both run exactly this code.

One request goes: ``authorize`` -> ``read_body`` (Content-Type, size) -> ``parse`` (one-pass JSON parse and
strict validation, preprocessing with the checkpoint's manifest) -> a dynamic batch of many requests'
``Job``s -> ``run_batch`` (one forward, one channel scoring, every response body built in the same call) ->
the bytes sent as they are.

Every check a request can fail happens in ``parse``, alone, before it joins a batch: a bad request is
answered with its own 4xx naming the field and never reaches the users it would have been batched with.
``run_batch`` still isolates its members: should the batch as a whole fail, each job is retried alone, so
one job's failure is that job's answer only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generic, Mapping, Optional, Sequence, TypeVar, Union

import numpy as np

from mtorl.spec import DecisionSpec
from mtorl.serving.schemas import (
    AllocateRequest, Limits, Prepared, Preprocessor, RecommendRequest, RequestError, allocation, parse_body,
    recommend_scores, recommendations,
)

JSON_TYPES = ("application/json",)
LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Job:
    """One validated request waiting for the model: its users' inputs and what to answer."""

    kind: str                      # "recommend" | "allocate"
    prepared: Prepared
    budget: float = 0.0
    penalty: Optional[float] = None


Answer = Union[bytes, RequestError]  # the response body, or this request's own error


def sample_user(pre: Preprocessor, user_id: str) -> dict[str, Any]:
    """A valid one-step request user for the checkpoint's manifest (all required features 0)."""
    feats = {f: 0.0 for f in pre.step_features if f not in pre.optional_step}
    user: dict[str, Any] = {"user_id": user_id,
                            "journey": [{"channel": pre.channels[0], "gain": 0.0, "cost": 1.0, "features": feats}]}
    if pre.user_features:
        user["user_features"] = {f: 0.0 for f in pre.user_features}
    return user


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()


class Service:
    """A loaded ``Predictor`` plus the request checks and preprocessing of its manifest.

    ``predictor``: ``mtorl.serving.predictor.Predictor`` (or anything with ``predict_next`` -> (probs, reward,
    reward spread or None), ``manifest``, ``meta``); ``limits``: the ServeSpec request limits; ``digest``:
    SHA-256 of the bearer token, None = no auth.
    """

    def __init__(self, predictor: Any, limits: Limits, max_body_bytes: int, digest: Optional[str] = None):
        self.predictor = predictor
        self.pre = Preprocessor(predictor.manifest, limits)
        self.decision = DecisionSpec.of_job(predictor.meta.spec)  # the checkpoint's decision: block
        self.max_body_bytes = max_body_bytes
        self.digest = digest
        self.version = predictor.meta.sha256.get("model.safetensors", "")[:12] or "unknown"
        self._head = b'{"model_version":' + _dumps(self.version) + b","
        self.stats = {"requests": 0, "users": 0, "batches": 0}

    # -- before the batch: every check a request can fail
    def authorize(self, headers: Mapping[str, str]) -> None:
        if self.digest is None:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if not token or not hmac.compare_digest(token_digest(token), self.digest):
            raise RequestError("authorization", "missing or invalid bearer token", status=401)

    async def read_body(self, headers: Mapping[str, str], stream: Callable[[], Any]) -> bytes:
        """The body, after the Content-Type (``application/json`` only: 415) and size (413) checks."""
        ctype = headers.get("content-type")
        if ctype is None or ctype.split(";", 1)[0].strip().lower() not in JSON_TYPES:
            raise RequestError("content-type", f"{ctype!r}: the body must be sent as application/json", status=415)
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError("content-length", "not an integer", status=400)
            if int(declared) > limit:
                raise RequestError("body", f"{declared} bytes, the limit is {limit} (max_body_bytes)", status=413)
        buf = bytearray()
        async for chunk in stream():
            buf += chunk
            if len(buf) > limit:
                raise RequestError("body", f"more than {limit} bytes (max_body_bytes)", status=413)
        return bytes(buf)

    def parse(self, kind: str, body: bytes) -> Job:
        """Raw body -> a validated, preprocessed ``Job`` (``RequestError`` 4xx naming the field)."""
        if kind == "recommend":
            req = parse_body(RecommendRequest, body)
            return Job(kind, self.pre.prepare(req.users))
        req = parse_body(AllocateRequest, body)
        return Job(kind, self.pre.prepare(req.users), budget=req.budget, penalty=req.penalty)

    # -- the batch
    def run_batch(self, jobs: Sequence[Job]) -> list[Answer]:
        """One model forward and one channel scoring over the users of ``jobs``; each job's response body
        (or its own error). Runs in a worker thread, off the event loop."""
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["users"] += sum(len(j.prepared) for j in jobs)
        try:
            return self._answers(jobs)
        except Exception:  # noqa: BLE001 - isolate: each job alone, so only a failing one fails
            return [self._alone(j) for j in jobs]

    def _alone(self, job: Job) -> Answer:
        try:
            return self._answers([job])[0]
        except Exception:  # noqa: BLE001 - this request's answer only
            return RequestError("", "internal error scoring this request", status=500)

    def _answers(self, jobs: Sequence[Job]) -> list[Answer]:
        ps = [j.prepared for j in jobs]
        journeys = [jr for p in ps for jr in p.journeys]
        nxt = np.concatenate([p.next_states for p in ps])                       # (sum B, D)
        costs = np.concatenate([p.costs for p in ps])                           # (sum B, C)
        # (sum B, C) each; sd: an ensemble's spread of the reward, None for a single model
        probs, reward, sd = self.predictor.predict_next(journeys, nxt)
        ok = np.isfinite(probs).all(axis=1) & np.isfinite(reward).all(axis=1)   # (sum B,)
        if sd is not None:
            ok &= np.isfinite(sd).all(axis=1)
        safe_p, safe_r = np.where(ok[:, None], probs, 1.0), np.where(ok[:, None], reward, 0.0)
        safe_sd = None if sd is None else np.where(ok[:, None], sd, 0.0)
        best, kb = recommend_scores(safe_p, safe_r, costs, self.decision, reward_std=safe_sd)  # (sum B,) each
        out: list[Answer] = []
        s = 0
        for j in jobs:
            n = len(j.prepared)
            sl = slice(s, s + n)
            s += n
            if not ok[sl].all():
                b = int(np.flatnonzero(~ok[sl])[0])
                out.append(RequestError(f"users[{b}]", "the model's output is not finite for this user's inputs "
                                                       "(far outside the training data's range)"))
                continue
            if j.kind == "recommend":
                users = recommendations(j.prepared, probs[sl], reward[sl], self.pre.channels, scored=(best[sl], kb[sl]))
                out.append(self._head + b'"users":' + _dumps(users) + b"}")
            else:
                res = allocation(j.prepared, probs[sl], reward[sl], self.pre.channels, j.budget, j.penalty, self.decision,
                                 reward_std=None if sd is None else sd[sl])
                out.append(self._head + _dumps(res)[1:])
        return out

    def warm_up(self) -> None:
        """One request of each kind through the whole path on a made-up user (lazy imports, first-call set-up)."""
        user = sample_user(self.pre, "warm-up")
        jobs = [self.parse("recommend", _dumps({"users": [user]})),
                self.parse("allocate", _dumps({"users": [user], "budget": 1.0}))]
        for a in self.run_batch(jobs):
            if isinstance(a, RequestError):
                raise RuntimeError(f"warm-up request failed: {a.detail}")
        self.stats = {"requests": 0, "users": 0, "batches": 0}


T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Dynamic batching for a plain asyncio server, as ``ray.serve.batch`` does in a replica: calls that
    arrive within ``wait_s`` of the first (up to ``max_batch_size``) run as one ``fn(list)`` in a worker
    thread; one batch at a time."""

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch_size: int = 32, wait_s: float = 0.005):
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._task: Optional[asyncio.Task[None]] = None
        self._full: Optional[asyncio.Event] = None

    def __call__(self, item: T) -> Awaitable[R]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, fut))
        if self._full is None:
            self._full = asyncio.Event()
        if len(self._queue) >= self.max_batch_size:
            self._full.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return fut

    async def _drain(self) -> None:
        assert self._full is not None
        while self._queue:
            if len(self._queue) < self.max_batch_size:
                try:
                    await asyncio.wait_for(self._full.wait(), self.wait_s)
                except asyncio.TimeoutError:
                    pass
            batch, self._queue = self._queue[:self.max_batch_size], self._queue[self.max_batch_size:]
            self._full.clear()
            if len(self._queue) >= self.max_batch_size:
                self._full.set()
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - the callers get the error
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)
