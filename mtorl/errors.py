"""The exceptions that mean "the user's input or environment is wrong": printed as one line."""

from __future__ import annotations


def _collect() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = []
    for mod, name in (
        ("mtorl.storage", "StorageError"),
        ("mtorl.data.errors", "DataError"),
        ("mtorl.data", "DataError"),
        ("mtorl.training.checkpoint", "CheckpointError"),
        ("mtorl.training.step", "NonFiniteLossError"),
    ):
        try:
            m = __import__(mod, fromlist=[name])
            e = getattr(m, name, None)
            if isinstance(e, type) and issubclass(e, BaseException) and e not in errs:
                errs.append(e)
        except ImportError:
            continue
    return tuple(errs) or (RuntimeError,)


USER_ERRORS = _collect()
