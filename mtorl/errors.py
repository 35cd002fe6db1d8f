"""The one base of every "the input or the environment is wrong" error: printed as one line, exit 2.

Importing this module imports nothing else (``mtorl validate`` must not pay for torch or Ray).
Every package error derives from :class:`MtorlError`: ``SpecError``, ``StorageError``, ``DataError``,
``CheckpointError``, ``NonFiniteLossError``, ``ClusterError``.
"""

from __future__ import annotations

import importlib
import re
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


_REMOTE = re.compile(r"^\s*(mtorl(?:\.\w+)+)\.(\w+Error): (.+)$", re.M)


def find_known(e: BaseException) -> MtorlError | None:
    """The first :class:`MtorlError` in ``e``'s chain (a Ray task or Train worker wraps the real error).
    Ray Data re-raises a task's error as a ``UserCodeException`` whose cause only survives as the remote
    traceback text: an ``mtorl....Error: message`` line there is rebuilt as that error."""
    chain = list(_causes(e))
    for c in chain:
        if isinstance(c, MtorlError):
            return c
    for c in chain:
        for mod, name, msg in _REMOTE.findall(str(c)):
            try:
                cls = getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError):
                continue
            if isinstance(cls, type) and issubclass(cls, MtorlError):
                try:
                    return cls(msg.strip())
                except TypeError:  # an error class with another signature (SpecError)
                    return MtorlError(msg.strip())
    return None


def validation_line(e: Any) -> str:
    """A pydantic ``ValidationError``'s first problem as ``field a.b: message`` (duck-typed: no import)."""
    err = e.errors()[0]
    return f"field {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"


def one_line(e: BaseException, limit: int = 500) -> str:
    """``e``'s message as one line (first non-empty line, else the type name), at most ``limit`` chars."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
