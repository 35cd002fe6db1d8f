"""Load, override and validate job specs. Errors name the file, the field path and the reason."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, cast

import yaml
from pydantic import TypeAdapter, ValidationError

from mtorl.errors import MtorlError
from mtorl.spec.models import KINDS, Job

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Job)


class SpecError(MtorlError):
    """A spec that can't be used. ``str()`` is one line per problem: ``FILE: FIELD: REASON``."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {path or '<document>'}: {reason}" for path, reason in problems))


def _path(loc: Iterable[Any]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in KINDS or p in ("function-after",):  # discriminator tags add no information
            continue
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``spec.trainer.workers=2`` -> (["spec", "trainer", "workers"], 2). Values are parsed as YAML."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like path.to.field=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ValueError(f"override {item!r} has an empty field path")
    return keys, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(doc: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                node[k] = nxt
            node = nxt
        node[keys[-1]] = value
    return out


def validate_doc(doc: Any, source: str = "<spec>") -> Any:
    if not isinstance(doc, dict):
        raise SpecError(source, [("", "a job spec must be a YAML mapping with apiVersion, kind, metadata and spec")])
    kind = doc.get("kind")
    if kind not in KINDS:
        raise SpecError(source, [("kind", f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")])
    try:
        return _ADAPTER.validate_python(doc)
    except ValidationError as e:
        probs = [(_path(err["loc"]), err["msg"]) for err in e.errors()]
        raise SpecError(source, probs) from None


def load_job(path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """Read a YAML spec, apply ``--set`` overrides, validate. Raises SpecError."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SpecError(source, [("", f"cannot read: {e.strerror or e}")]) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(source, [("", f"not valid YAML: {e}")]) from None
    try:
        doc = apply_overrides(doc if isinstance(doc, dict) else {}, overrides) if overrides else doc
    except ValueError as e:
        raise SpecError(source, [("--set", str(e))]) from None
    return validate_doc(doc, source)


def job_to_dict(job: Any) -> dict[str, Any]:
    return cast(dict[str, Any], job.model_dump(mode="json", by_alias=True, exclude_none=False))


def job_to_yaml(job: Any) -> str:
    return cast(str, yaml.safe_dump(job_to_dict(job), sort_keys=False))


def make_job(kind: str, name: str, spec: dict[str, Any]) -> Any:
    return validate_doc({"apiVersion": "mtorl/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}, f"<{kind}>")
