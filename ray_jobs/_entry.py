"""Shared body of the ray_jobs entrypoints."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
from pathlib import Path


def _arm_deadline() -> None:
    """runPolicy.activeDeadlineSeconds, passed by `mtorl submit` as MTORL_ACTIVE_DEADLINE_SECONDS:
    the entrypoint ends itself (exit 124) when it expires, with or without a waiting submitter."""
    raw = os.environ.get("MTORL_ACTIVE_DEADLINE_SECONDS")
    if not raw:
        return

    def expire() -> None:
        print(f"error: runPolicy.activeDeadlineSeconds exceeded ({raw} s left at start); stopping the job",
              file=sys.stderr, flush=True)
        os._exit(124)

    timer = threading.Timer(float(raw), expire)
    timer.daemon = True
    timer.start()


def run(command: str, argv: list[str] | None = None) -> int:
    """Run the job kind registered for ``command`` (mtorl.registry) on the spec in ``argv``; a command
    no kind is registered for is refused in one line (exit 2)."""
    from mtorl import storage
    from mtorl.cli import main
    from mtorl.registry import by_command
    from mtorl.spec import SpecError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        by_command(command)
    except SpecError as e:
        print(str(e), file=sys.stderr, flush=True)
        return 2
    cred = os.environ.get("MTORL_CREDENTIALS_FILE")
    if cred and not os.path.isabs(cred):  # staged in the working_dir by `mtorl submit`: pin it before any chdir
        os.environ["MTORL_CREDENTIALS_FILE"] = os.path.abspath(cred)
    if cred:
        from mtorl.storage.credentials import export_to_environ

        export_to_environ()  # WANDB_API_KEY for the W&B callback in this driver
    _arm_deadline()
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
