"""YAML reading, ``--set`` overrides and pydantic validation with messages a user can act on.

Every failure raises :class:`SpecError` whose text names the file, the YAML line
where known, the dotted field path, what was wrong and, for unknown keys, the
closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import SpecError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping; SpecError for a missing file, syntax error (with line) or non-mapping."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"{p}: file not found")
    if p.is_dir():
        raise SpecError(f"{p}: is a folder; give a spec .yaml file")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{p}:{where}: YAML syntax error: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{p}: the top level must be a mapping of sections (model:, train:, ...), got {type(data).__name__}")
    _line_index[str(p)] = _key_lines(text)
    return data


# file -> {dotted path: line}; filled by read_yaml so messages can point at lines.
_line_index: dict[str, dict[str, int]] = {}


def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key path of a YAML document to its 1-based line."""
    out: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, val_node in node.value:
                path = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                out[path] = key_node.start_mark.line + 1
                walk(val_node, path)

    if root is not None:
        walk(root, "")
    return out


def spec_yaml(spec: BaseModel) -> str:
    """A validated spec as YAML, fields in declaration order (run folders, checkpoints, sweep folders)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value)."""
    if "=" not in item:
        raise SpecError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.lr=3e-4")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise SpecError(f"--set {item!r}: the key must be a dotted path like train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(data: dict[str, Any], parts: list[str], value: Any, *, label: str) -> None:
    """Set ``data[p0][p1]... = value``, creating mappings; SpecError if a non-mapping is in the way."""
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise SpecError(f"{label}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, recursively for mappings (a new dict; inputs unchanged).

    Used to put a spec file over a scaling profile's defaults: the spec wins key by key.
    """
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str], source: str) -> dict[str, Any]:
    """Apply ``--set`` overrides to a copy of ``data`` (validation happens after)."""
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        set_path(out, parts, value, label=f"--set {item}")
    return out


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class reached by following ``loc`` from ``cls``."""
    current: type[BaseModel] = cls
    for part in loc:
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *typing.get_args(ann)]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        current = nxt
    return current


def valid_paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted leaf path of a spec model (used for suggestions and sweep path checks)."""
    out: list[str] = []
    for name, field in cls.model_fields.items():
        path = f"{prefix}{name}"
        sub = _model_at(cls, (name,))
        if sub is not None:
            out.extend(valid_paths(sub, path + "."))
        else:
            out.append(path)
    return out


def suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def format_validation_error(cls: type[BaseModel], exc: ValidationError, source: str) -> str:
    """Turn a pydantic ValidationError into lines of ``file:line: path: message``."""
    lines_for = _line_index.get(source, {})
    msgs: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc)
        line = lines_for.get(path)
        where = f"{source}:{line}" if line else source
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(cls, loc[:-1])
            choices = list(parent.model_fields) if parent else []
            text = f"unknown key {str(loc[-1])!r}{suggest(str(loc[-1]), choices)}"
            if choices:
                text += f" (valid keys here: {', '.join(choices)})"
        else:
            text = err["msg"]
            if text.startswith("Value error, "):
                text = text[len("Value error, ") :]
            if kind not in ("value_error", "assertion_error") and "input" in err and not isinstance(err["input"], dict):
                text += f" (got {err['input']!r})"
        msgs.append(f"{where}: {path + ': ' if path else ''}{text}")
    return "\n".join(msgs)


def validate_as(cls: type[M], data: dict[str, Any], source: str) -> M:
    """Validate ``data`` as ``cls`` or raise SpecError with every problem listed."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(cls, exc, source)) from None
