"""Load, override and validate job specs. Errors name the file, the field path and the reason."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar, cast

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from mtorl.errors import MtorlError
from mtorl.spec.models import KINDS, Job

_ADAPTER: TypeAdapter[Any] = TypeAdapter(Job)
_M = TypeVar("_M", bound=BaseModel)


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


_MAX_INT_DIGITS = 30


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type information
    """PyYAML's safe loader, stricter: duplicate keys are an error, ``1e-3`` is a float (YAML 1.2) rather
    than a string, and an integer of more than 30 digits is refused before Python converts it."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            dup = key in seen
        except TypeError:  # unhashable key: let PyYAML report it
            dup = False
        if dup:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})", key_node.start_mark)
        if not isinstance(key, (list, dict)):
            seen[key] = key_node
    return dict(loader.construct_mapping(node, deep=deep))


def _int(loader: _Loader, node: yaml.ScalarNode) -> int:
    digits = sum(c.isdigit() for c in str(node.value))
    if digits > _MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(None, None, f"integer with {digits} digits is out of range", node.start_mark)
    return int(loader.construct_yaml_int(node))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor("tag:yaml.org,2002:int", _int)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse one YAML document with the strict safe loader; raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _decode(data: bytes) -> str:
    """Spec bytes -> text: UTF-8 only; a UTF-16 file, a binary file or invalid UTF-8 is one clear reason."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ValueError("is UTF-16 text: save the spec as UTF-8")
    if b"\x00" in data:
        raise ValueError("is a binary file (NUL bytes), not a YAML spec")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"is not UTF-8 text (invalid byte at offset {e.start})") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``spec.trainer.workers=2`` -> (["spec", "trainer", "workers"], 2). Values are parsed as YAML."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like path.to.field=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ValueError(f"override {item!r} has an empty field path")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_reason(e)})") from None
    return keys, value


def _yaml_reason(e: yaml.YAMLError) -> str:
    """One line from a PyYAML error: the problem and where."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


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


def _msg(err: Any) -> str:
    """pydantic's message without its "Value error, " prefix, plus the offending scalar (``got 1e+30``)."""
    msg = str(err["msg"]).removeprefix("Value error, ")
    value = err.get("input")
    if err.get("type") != "value_error" and isinstance(value, (bool, int, float, str)) and not isinstance(err.get("ctx"), dict) \
            or err.get("type") in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        shown = repr(value) if not isinstance(value, int) or isinstance(value, bool) or abs(value) < 10**12 else f"{value:.3e}"
        if isinstance(value, (bool, int, float, str)) and len(shown) <= 60:
            msg += f" (got {shown})"
    return msg


def validate_doc(doc: Any, source: str = "<spec>") -> Any:
    if not isinstance(doc, dict):
        raise SpecError(source, [("", "a job spec must be a YAML mapping with apiVersion, kind, metadata and spec")])
    kind = doc.get("kind")
    if kind not in KINDS:
        raise SpecError(source, [("kind", f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")])
    try:
        return _ADAPTER.validate_python(doc)
    except ValidationError as e:
        probs = [(_path(err["loc"]), _msg(err)) for err in e.errors()]
        raise SpecError(source, probs) from None


def validate_part(model: type[_M], doc: Mapping[str, Any], path: str, source: str) -> _M:
    """``doc`` validated as ``model``, the block of a spec at ``path`` (``decision``): the rules of a spec file,
    and a SpecError whose lines name ``SOURCE: path.field: REASON`` (``--decision: decision.fill: ...``)."""
    try:
        return model.model_validate(dict(doc))
    except ValidationError as e:
        raise SpecError(source, [(_path([path, *err["loc"]]), _msg(err)) for err in e.errors()]) from None


def load_job(path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """Read a YAML spec, apply ``--set`` overrides, validate. Raises SpecError."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SpecError(source, [("", f"cannot read: {e.strerror or e}")]) from None
    if len(data) > 4_000_000:
        raise SpecError(source, [("", f"is {len(data)} bytes: too large for a spec (at most 4 MB)")])
    try:
        doc = load_yaml(_decode(data))
    except ValueError as e:
        raise SpecError(source, [("", str(e))]) from None
    except yaml.YAMLError as e:
        raise SpecError(source, [("", f"not valid YAML: {_yaml_reason(e)}")]) from None
    except RecursionError:
        raise SpecError(source, [("", "not valid YAML: nested too deeply")]) from None
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
