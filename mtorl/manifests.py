"""KubeRay manifests: ``cluster/kuberay/templates/*.yaml`` rendered with checked values (``make manifests``).

    python -m mtorl.manifests [--values my.env ...] [--out build/manifests]

Values come from ``cluster/kuberay/values.env`` (every key, with its default), then each ``--values`` file
(``KEY=VALUE`` lines, any subset of the keys), then environment variables of the same names. They are typed
and checked (``ManifestValues``: integers, Kubernetes quantities, image references, a pinned checkpoint)
before any file is written, so a rendered manifest never holds a string where Kubernetes wants a number.
Derived values: ``GPU_TRAIN_WORKERS`` (GPU pods x GPUs per pod), and the RayService's ``SERVE_CONFIG_V2``
and ``SERVE_TOKEN_ENV``, generated from ``SERVE_SPEC`` with ``CHECKPOINT`` by
``mtorl.serving.kuberay.rayservice_config``. The output folder holds one file per template, ready for
``kubectl apply -f FILE``; ``secret.example.yaml`` is never copied there.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

# Kubernetes resource.Quantity (the pattern KubeRay's CRDs carry for int-or-string quantities).
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?"
    r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# registry[:port]/path[:tag][@sha256:digest], lower-case path components (the distribution reference grammar).
IMAGE_PATTERN = (
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]{1,2}[a-z0-9]+)*)+"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?$"
)
Quantity = Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN)]
Image = Annotated[str, StringConstraints(pattern=IMAGE_PATTERN)]
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")

ROOT_HINT = "run it from the repository root (make manifests does)"
DEFAULT_VALUES = Path("cluster/kuberay/values.env")
DEFAULT_TEMPLATES = Path("cluster/kuberay/templates")
DEFAULT_OUT = Path("build/manifests")


class ManifestError(Exception):
    """Bad values or templates: one line per problem, naming the file/line or the key."""


class ManifestValues(BaseModel):
    """The placeholders' values (upper-case in files and templates: ``image`` is ``IMAGE``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: Image = Field(description="The CPU image (Dockerfile).")
    gpu_image: Image = Field(description="The CUDA image (Dockerfile, --build-arg TORCH_VARIANT=cu...).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"]
    head_cpu: Quantity
    head_memory: Quantity
    workers: int = Field(ge=0, description="CPU worker pods (raycluster: the autoscaler's minimum).")
    max_workers: int = Field(ge=0, description="raycluster: the autoscaler's maximum of CPU worker pods.")
    worker_cpu: Quantity
    worker_memory: Quantity
    gpu_workers: int = Field(ge=1, description="rayjob-train-gpu: GPU worker pods.")
    gpu_max_workers: int = Field(ge=0, description="raycluster: the autoscaler's maximum of GPU worker pods.")
    gpus_per_worker: int = Field(ge=1, description="nvidia.com/gpu per GPU pod (whole GPUs).")
    gpu_worker_cpu: Quantity
    gpu_worker_memory: Quantity
    serve_workers: int = Field(ge=0, description="rayservice: worker pods.")
    serve_worker_cpu: Quantity
    serve_worker_memory: Quantity
    serve_spec: str = Field(min_length=1, description="The ServeSpec file the RayService serves.")
    checkpoint: str = Field(pattern=r"^s3://\S+$", description="The one checkpoint every replica loads.")

    @model_validator(mode="after")
    def _ranges(self) -> "ManifestValues":
        if self.max_workers < self.workers:
            raise ValueError(f"MAX_WORKERS ({self.max_workers}) must be at least WORKERS ({self.workers})")
        return self

    def variables(self) -> dict[str, str]:
        """Every placeholder's text, the derived ones included (the Serve config is generated here)."""
        from mtorl.serving.kuberay import rayservice_args, rayservice_config_yaml
        from mtorl.spec import SpecError, load_job

        out = {k.upper(): str(v) for k, v in self.model_dump().items()}
        out["GPU_TRAIN_WORKERS"] = str(self.gpu_workers * self.gpus_per_worker)
        try:
            job = load_job(self.serve_spec)
        except (SpecError, OSError) as e:
            raise ManifestError(f"SERVE_SPEC={self.serve_spec}: {e}") from None
        if job.kind != "ServeJob":
            raise ManifestError(f"SERVE_SPEC={self.serve_spec}: a {job.kind}, not a ServeJob")
        try:
            args = rayservice_args(job.spec, checkpoint=self.checkpoint)
        except (ValueError, ValidationError) as e:
            msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            raise ManifestError(
                f"SERVE_SPEC={self.serve_spec} with CHECKPOINT={self.checkpoint}: {msg.removeprefix('Value error, ')}"
            ) from None
        out["SERVE_TOKEN_ENV"] = str(args.auth_token_env)
        out["SERVE_CONFIG_V2"] = rayservice_config_yaml(job.spec, checkpoint=self.checkpoint).rstrip("\n")
        return out


KEYS = {name.upper() for name in ManifestValues.model_fields}


def read_values_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines); an unknown key or a bad line names file:line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ManifestError(f"{path}: {e.strerror or e}") from None
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        key, eq, value = s.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise ManifestError(f"{path}:{n}: expected KEY=VALUE, got {s!r}")
        if key not in KEYS:
            raise ManifestError(f"{path}:{n}: unknown key {key} (known: {', '.join(sorted(KEYS))})")
        out[key] = value
    return out


def load_values(files: Sequence[Path], environ: Mapping[str, str] | None = None) -> tuple[ManifestValues, list[str]]:
    """The values from ``files`` in order, then ``environ`` (default os.environ); returns (values, sources)."""
    environ = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    origin: dict[str, str] = {}
    for f in files:
        for k, v in read_values_file(Path(f)).items():
            raw[k], origin[k] = v, str(f)
    from_env = sorted(k for k in KEYS if k in environ)
    for k in from_env:
        raw[k], origin[k] = environ[k].strip(), "the environment"
    try:
        values = ManifestValues.model_validate({k.lower(): v for k, v in raw.items()})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = str(err["loc"][0]).upper() if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                problems.append(f"{key}: no value (set it in {files[0] if files else 'a values file'})")
            elif key:
                problems.append(f"{key}={raw.get(key, '')!r} (from {origin.get(key, '?')}): {msg}")
            else:
                problems.append(msg)
        raise ManifestError("; ".join(problems)) from None
    sources = [str(f) for f in files] + ([f"environment ({', '.join(from_env)})"] if from_env else [])
    return values, sources


def render_text(text: str, variables: Mapping[str, str], source: str) -> str:
    """Fill ``${NAME}`` placeholders. A multi-line value must stand alone on its line (a YAML block
    scalar): each of its lines gets that line's indentation."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            out.append(line)  # comments may name placeholders
            continue
        for name in PLACEHOLDER.findall(line):
            if name not in variables:
                raise ManifestError(f"{source}:{n}: ${{{name}}} has no value (known: {', '.join(sorted(variables))})")
        alone = PLACEHOLDER.fullmatch(line.strip())
        if alone and "\n" in variables[alone.group(1)]:
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + v if v else "" for v in variables[alone.group(1)].splitlines())
            continue

        def one(m: re.Match[str]) -> str:
            value = variables[m.group(1)]
            if "\n" in value:
                raise ManifestError(f"{source}:{n}: ${{{m.group(1)}}} is multi-line: it must stand alone on its line")
            return value

        out.append(PLACEHOLDER.sub(one, line))
    return "\n".join(out) + "\n"


def render(templates: Path, values: ManifestValues, sources: Sequence[str] = ()) -> dict[str, str]:
    """{file name: rendered text} for every template; each must parse as YAML with no placeholder left."""
    paths = sorted(templates.glob("*.yaml"))
    if not paths:
        raise ManifestError(f"{templates}: no *.yaml templates ({ROOT_HINT})")
    variables = values.variables()
    out = {}
    for p in paths:
        body = p.read_text().splitlines()
        while body and body[0].startswith(("# TEMPLATE", "#   make manifests")):
            body.pop(0)  # the template's "render me first" lines
        head = (
            f"# Rendered by `make manifests` from {p.as_posix()} (values: {', '.join(sources) or 'given'}).\n"
            f"# Apply: kubectl apply -f {p.name}\n"
        )
        text = head + render_text("\n".join(body), variables, str(p))
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            raise ManifestError(f"{p}: the rendered YAML does not parse: {e}") from None
        if not docs or PLACEHOLDER.search(yaml.safe_dump_all(docs)):
            raise ManifestError(f"{p}: rendered to no document, or a placeholder is left")
        out[p.name] = text
    return out


def write(rendered: Mapping[str, str], out: Path) -> list[Path]:
    """Each file written whole (temp file + rename): a reader never sees half a manifest."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered.items():
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out / name)
        written.append(out / name)
    return written


if __name__ == "__main__":
    from mtorl.cli import manifests_main

    raise SystemExit(manifests_main())
