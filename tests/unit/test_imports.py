"""Import-time contracts, checked in ONE fresh interpreter for the whole file.

Each check used to start its own ``python -c`` (a few seconds of start-up and imports each on 2 cores).
The script below runs them all in one subprocess: the checks that need a process with nothing heavy
imported run in a forked child each; the models check then blocks Ray in the parent. Every check
records its own result, so one failure never hides another. (The serving import check stays in
test_serving_schemas.py for now: parallel branches edit that file; it can join this script later.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HEAVY = ("torch", "safetensors", "ray", "sklearn", "scipy", "matplotlib")

SCRIPT = r"""
import json, os, runpy, sys, traceback

HEAVY = set(json.loads(sys.argv[2]))
bad_spec = sys.argv[1]
results = {}


def loaded():
    return sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod is not None} & HEAVY)


def run(name, fn):
    try:
        results[name] = {"ok": True, **fn()}
    except BaseException:  # the check's own failure, recorded: the other checks still run
        results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}


def forked(name, fn):
    # a child forked while nothing heavy is imported: the check sees a fresh interpreter's modules
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        run(name, fn)
        os.write(w, json.dumps(results[name]).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    results[name] = json.loads(data) if data else {"ok": False, "error": "the forked check died"}


def validate():
    # `python -m mtorl validate FILE`, run as the console script would, its stderr captured at fd 2
    err_path = bad_spec + ".stderr"
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    sys.argv = ["mtorl", "validate", bad_spec]
    try:
        runpy.run_module("mtorl", run_name="__main__", alter_sys=True)
        rc = 0
    except SystemExit as e:
        rc = e.code
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stderr.flush()
    return {"rc": rc, "stderr": open(err_path).read(), "heavy": loaded()}


def data():
    sys.modules["ray"] = None  # any import of ray raises
    import mtorl.data.windows, mtorl.data.prepare, mtorl.data.converters, mtorl.data.manifest  # noqa: E401, F401
    return {"heavy": loaded()}


def models():
    sys.modules["ray"] = None
    import mtorl.models, mtorl.models.export, mtorl.training.losses  # noqa: E401, F401
    ray = sorted(m for m in sys.modules if (m == "ray" or m.startswith("ray.")) and sys.modules[m] is not None)
    return {"ray_modules": ray}


forked("validate", validate)
forked("data", data)
run("models", models)
print("IMPORT-CHECKS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def import_checks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bad = tmp_path_factory.mktemp("imports") / "bad.yaml"
    bad.write_text(
        "apiVersion: mtorl/v1\nkind: TrainJob\nmetadata: {name: x}\nspec: {data: a, output: b, trainer: {epochs: 0}}\n"
    )
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(bad), json.dumps(HEAVY)], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[2])
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("IMPORT-CHECKS ")), None)
    assert r.returncode == 0 and line, f"the import-check script failed (exit {r.returncode}):\n{r.stderr[-3000:]}"
    res: dict[str, Any] = json.loads(line.split(" ", 1)[1])
    res["_bad_spec"] = str(bad)
    return res


def _check(res: dict[str, Any], name: str) -> dict[str, Any]:
    c: dict[str, Any] = res[name]
    assert c["ok"], f"{name}: {c.get('error')}"
    return c


def test_cli_validate_exits_2_with_file_field_reason(import_checks: dict[str, Any]) -> None:
    c = _check(import_checks, "validate")
    assert c["rc"] == 2
    bad = import_checks["_bad_spec"]
    assert f"{bad}: spec.trainer.epochs: Input should be greater than or equal to 1" in c["stderr"]
    assert "Traceback" not in c["stderr"]


def test_validate_imports_no_torch_or_ray(import_checks: dict[str, Any]) -> None:
    """``mtorl validate`` (and the error hierarchy it imports) stays cheap: no torch, safetensors or Ray."""
    c = _check(import_checks, "validate")
    assert not {"torch", "safetensors", "ray"} & set(c["heavy"]), c["heavy"]


def test_data_modules_import_without_ray(import_checks: dict[str, Any]) -> None:
    c = _check(import_checks, "data")
    assert "torch" not in c["heavy"], c["heavy"]


def test_models_import_without_ray(import_checks: dict[str, Any]) -> None:
    c = _check(import_checks, "models")
    assert not c["ray_modules"], c["ray_modules"]

