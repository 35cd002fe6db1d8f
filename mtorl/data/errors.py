"""The one exception of the data layer: bad input or a dataset that can't be used (one clear line)."""

from __future__ import annotations

from mtorl.errors import MtorlError


class DataError(MtorlError):
    """Input data or a prepared dataset that can't be used: names the file/URI, row and field."""
