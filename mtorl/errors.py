"""The one base of every "the input or the environment is wrong" error: printed as one line, exit 2.

Importing this module imports nothing else (``mtorl validate`` must not pay for torch or Ray).
Every package error derives from :class:`MtorlError`: ``SpecError``, ``StorageError``, ``DataError``,
``CheckpointError``, ``NonFiniteLossError``, ``ClusterError``.
"""

from __future__ import annotations

from typing import Any, Iterator


class MtorlError(Exception):
    """A known failure whose message is one line naming the file, row, field or object and the reason."""

    exit_code = 2


USER_ERRORS: tuple[type[BaseException], ...] = (MtorlError,)


def _causes(e: BaseException, depth: int = 0) -> Iterator[BaseException]:
    """``e`` and what it wraps: ``__cause__``/``__context__``, Ray's ``.cause``, Ray Train's per-worker failures."""
    if depth > 8:
        return
    yield e
    nested: list[Any] = [getattr(e, "cause", None), e.__cause__, e.__context__]
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict):
        nested += list(failures.values())
    for n in nested:
        if isinstance(n, BaseException) and n is not e:
            yield from _causes(n, depth + 1)


def find_known(e: BaseException) -> MtorlError | None:
    """The first :class:`MtorlError` in ``e``'s chain (a Ray task or Train worker wraps the real error)."""
    for c in _causes(e):
        if isinstance(c, MtorlError):
            return c
    return None


def one_line(e: BaseException, limit: int = 500) -> str:
    """``e``'s message as one line (first non-empty line, else the type name), at most ``limit`` chars."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
