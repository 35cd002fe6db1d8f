"""The one storage exception: a single line naming the URI and the reason."""

from __future__ import annotations

from mtorl.errors import MtorlError


class StorageError(MtorlError, RuntimeError):
    """A storage operation failed: ``"<uri>: <reason>"`` on one line, never a secret."""
