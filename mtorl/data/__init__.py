"""Logs -> CMDP journeys (converters, prepare), manifest, pure numpy windows, Ray Data pipeline.

Only ``mtorl.data.pipeline`` imports Ray; import submodules explicitly.
"""

from mtorl.data.errors import DataError

__all__ = ["DataError"]
