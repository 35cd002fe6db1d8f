"""Vendor the KubeRay v1 CRD schemas the manifest tests check against (tests/unit/kuberay_crds.json).

    python scripts/vendor_kuberay_crds.py KUBERAY_CHECKOUT [--ref v1.7.0]

Reads ``ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,rayservices}.yaml`` at ``--ref`` (git
show, so the checkout's work tree may be at any commit) and writes, for each kind, the ``v1``
``openAPIV3Schema`` of ``spec`` made smaller and stricter:

* ``description`` texts and ``status`` are dropped;
* every embedded core Kubernetes object (``PodTemplateSpec``: head, worker groups, RayJob submitter;
  ``Service``: headService, serveService) is replaced by ``{"x-core-kind": KIND}``: the tests validate
  those against the core schema of a maintained validator (kubernetes-validate) instead;
* ``additionalProperties: false`` is added to every object schema that lists ``properties`` and does not
  keep unknown fields (``x-kubernetes-preserve-unknown-fields``): the API server prunes (drops) such
  fields silently, so a misspelled field is an error here.

The CRDs are KubeRay's (https://github.com/ray-project/kuberay, Apache-2.0, Copyright the KubeRay
authors); the derived file keeps their source, ref and licence in its ``_source`` entry.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
OUT = Path(__file__).resolve().parents[1] / "tests" / "unit" / "kuberay_crds.json"


def _core_kind(node: dict[str, Any]) -> str | None:
    props = node.get("properties") or {}
    spec = (props.get("spec") or {}).get("properties") or {}
    if "containers" in spec and "metadata" in props:
        return "PodTemplateSpec"
    if {"apiVersion", "kind", "metadata", "spec"} <= set(props) and "ports" in spec and "selector" in spec:
        return "Service"
    return None


def prune(node: Any) -> Any:
    if isinstance(node, list):
        return [prune(x) for x in node]
    if not isinstance(node, dict):
        return node
    kind = _core_kind(node)
    if kind:
        return {"x-core-kind": kind}
    out = {k: prune(v) for k, v in node.items() if k != "description"}
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kuberay", type=Path, help="a git checkout of ray-project/kuberay")
    ap.add_argument("--ref", default="v1.7.0")
    a = ap.parse_args()
    commit = subprocess.run(["git", "-C", str(a.kuberay), "rev-parse", f"{a.ref}^{{commit}}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    doc: dict[str, Any] = {"_source": {
        "repository": "https://github.com/ray-project/kuberay", "ref": a.ref, "commit": commit,
        "files": [f"ray-operator/config/crd/bases/ray.io_{p}.yaml" for p in KINDS.values()],
        "license": "Apache-2.0 (Copyright the KubeRay authors); derived: descriptions and status removed, "
                   "core objects replaced by x-core-kind, additionalProperties false where the API server prunes",
        "written_by": "scripts/vendor_kuberay_crds.py"}}
    for kind, plural in KINDS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        text = subprocess.run(["git", "-C", str(a.kuberay), "show", f"{commit}:{path}"],
                              check=True, capture_output=True, text=True).stdout
        crd = yaml.safe_load(text)
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = v1["schema"]["openAPIV3Schema"]
        doc[kind] = prune(schema["properties"]["spec"])
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) from kuberay {a.ref} ({commit[:12]})")


if __name__ == "__main__":
    main()
