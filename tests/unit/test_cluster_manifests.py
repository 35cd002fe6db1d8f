"""KubeRay manifests (cluster/kuberay): rendered with defaults.env, then checked against the fields the
ray.io/v1 CRDs require, and every entrypoint, Serve import_path and spec file resolves in this repo."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import string
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
MANIFESTS = sorted(p for p in KUBERAY.glob("*.yaml") if not p.name.startswith("secret"))
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def _defaults() -> dict[str, str]:
    out = {}
    for line in (KUBERAY / "defaults.env").read_text().splitlines():
        m = re.match(r"^(\w+)=\$\{\w+:-(.*)\}$", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _render(path: Path) -> list[dict[str, Any]]:
    text = string.Template(path.read_text()).substitute(_defaults())  # KeyError: a variable without a default
    return [d for d in yaml.safe_load_all(text) if d]


def _docs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in MANIFESTS for d in _render(p)]


def _check_pod_template(where: str, tmpl: Any) -> None:
    assert isinstance(tmpl, dict) and tmpl.get("spec", {}).get("containers"), f"{where}: template.spec.containers"
    for c in tmpl["spec"]["containers"]:
        assert c.get("name") and c.get("image"), f"{where}: container name and image"
        assert "$" not in c["image"], f"{where}: unrendered image"
        refs = [e.get("secretRef", {}).get("name") for e in c.get("envFrom", [])]
        refs += [e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") for e in c.get("env", [])]
        assert "mtorl-object-store" in refs, f"{where}: object-store credentials must come from the Secret"
        for e in c.get("env", []):
            assert not e.get("name", "").startswith("AWS_") or "valueFrom" in e, f"{where}: {e['name']} inline"


def _check_cluster_spec(where: str, spec: dict[str, Any]) -> None:
    head = spec.get("headGroupSpec")
    assert isinstance(head, dict), f"{where}: headGroupSpec is required"
    _check_pod_template(f"{where}.headGroupSpec", head.get("template"))
    for group in [head, *spec.get("workerGroupSpecs", [])]:
        for k, v in (group.get("rayStartParams") or {}).items():
            assert isinstance(v, str), f"{where}: rayStartParams.{k} must be a string, got {v!r}"
    for g in spec.get("workerGroupSpecs", []):
        for k in ("groupName", "minReplicas", "maxReplicas", "template"):
            assert k in g, f"{where}: worker group needs {k}"
        assert isinstance(g["minReplicas"], int) and isinstance(g["maxReplicas"], int)
        assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        _check_pod_template(f"{where}.{g['groupName']}", g["template"])


def _check_entrypoint(where: str, entrypoint: str) -> None:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"], f"{where}: entrypoint must be `python -m MODULE ...`"
    assert importlib.util.find_spec(argv[2]) is not None, f"{where}: module {argv[2]} not found"
    for a in argv[3:]:
        if a.endswith((".yaml", ".yml")):
            assert a.startswith("ray_jobs/specs/") and (ROOT / a).exists(), f"{where}: spec {a} not in ray_jobs/specs"
            from mtorl.spec import load_job

            load_job(ROOT / a)


def test_every_manifest_is_a_known_kuberay_kind() -> None:
    kinds = [d["kind"] for _, d in _docs()]
    assert {"RayCluster", "RayJob", "RayService"} <= set(kinds)
    for name, d in _docs():
        assert d["apiVersion"] == "ray.io/v1", name
        assert d["metadata"]["name"], name


@pytest.mark.parametrize("name,doc", _docs(), ids=lambda x: x if isinstance(x, str) else "")
def test_required_fields(name: str, doc: dict[str, Any]) -> None:
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        _check_cluster_spec(name, spec)
    elif doc["kind"] == "RayJob":
        assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES, name
        _check_cluster_spec(name, spec["rayClusterSpec"])
        _check_entrypoint(name, spec["entrypoint"])
        if "runtimeEnvYAML" in spec:
            assert isinstance(spec["runtimeEnvYAML"], str) and isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    elif doc["kind"] == "RayService":
        assert "rayClusterConfig" in spec, name
        _check_cluster_spec(name, spec["rayClusterConfig"])
        assert isinstance(spec["serveConfigV2"], str), f"{name}: serveConfigV2 must be a string"
    else:
        pytest.fail(f"{name}: unexpected kind {doc['kind']}")


def test_rayjob_entrypoints_cover_train_and_tune() -> None:
    entries = [d["spec"]["entrypoint"] for _, d in _docs() if d["kind"] == "RayJob"]
    assert any("ray_jobs.train" in e for e in entries) and any("ray_jobs.tune" in e for e in entries)


def test_serve_import_paths_resolve() -> None:
    for name, d in _docs():
        if d["kind"] != "RayService":
            continue
        cfg = yaml.safe_load(d["spec"]["serveConfigV2"])
        assert cfg["applications"], name
        for app in cfg["applications"]:
            module, _, attr = app["import_path"].partition(":")
            assert importlib.util.find_spec(module) is not None, f"{name}: module {module} not found"
            assert callable(getattr(importlib.import_module(module), attr, None)), f"{name}: {app['import_path']} missing"
            if app.get("args", {}).get("host") not in (None, "127.0.0.1"):
                assert app["args"].get("auth_token_env"), f"{name}: a non-loopback host needs auth_token_env"


def test_secret_example_holds_no_real_credentials() -> None:
    doc = yaml.safe_load((KUBERAY / "secret.example.yaml").read_text())
    assert doc["kind"] == "Secret"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(doc["stringData"])
    assert doc["stringData"]["AWS_SECRET_ACCESS_KEY"] == "CHANGE-ME"


def test_local_scripts_are_executable() -> None:
    for s in ("up.sh", "down.sh", "status.sh"):
        p = ROOT / "cluster" / "local" / s
        assert p.exists() and p.stat().st_mode & 0o111, s
