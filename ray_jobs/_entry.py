"""Shared body of the ray_jobs entrypoints."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def run(command: str, argv: list[str] | None = None) -> int:
    from mtorl import storage
    from mtorl.cli import main

    argv = list(sys.argv[1:] if argv is None else argv)
    result_uri = os.environ.get("MTORL_RESULT_URI")
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "result.json"
        code = main([command, *argv, "--result", str(local)])
        if result_uri and local.exists():
            storage.write_bytes(result_uri, local.read_bytes())
            print(f"result stored at {result_uri}", flush=True)
        elif code == 0 and local.exists():
            print(json.dumps(json.loads(local.read_text()), default=str)[:2000], flush=True)
    return code
