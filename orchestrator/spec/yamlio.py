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
from pydantic import BaseModel, Tag, ValidationError

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


def _tagged_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """{tag: class} of a tagged union (the run spec's per-family ``model`` / ``diffusion``); {} otherwise."""
    out: dict[str, type[BaseModel]] = {}
    for member in typing.get_args(annotation):
        if typing.get_origin(member) is typing.Annotated:
            cls, *meta = typing.get_args(member)
            tag = next((m.tag for m in meta if isinstance(m, Tag)), None)
            if tag is not None and isinstance(cls, type) and issubclass(cls, BaseModel):
                out[tag] = cls
    return out


def _walk(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None, str | None]:
    """Follow a pydantic error ``loc`` from ``cls``: (the path a user writes, without union tags; the
    model class reached, or None at a value; the family tag of the last tagged union passed)."""
    current: type[BaseModel] | None = cls
    parts: list[str] = []
    tag: str | None = None
    items = list(loc)
    while items:
        part = str(items.pop(0))
        parts.append(part)
        field = current.model_fields.get(part) if current is not None else None
        if field is None:
            current = None
            continue
        members = _tagged_members(field.annotation)
        if members and items and str(items[0]) in members:
            tag = str(items.pop(0))
            current = members[tag]
            continue
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return parts, current, tag


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class reached by following ``loc`` from ``cls`` (union tags included in loc)."""
    return _walk(cls, loc)[1]


def _user_fields(cls: type[BaseModel]) -> list[str]:
    """Fields a user may write (not the run spec's internal family tag, which is excluded from dumps)."""
    return [name for name, f in cls.model_fields.items() if not f.exclude]


def valid_paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted leaf path of a spec model (used for suggestions and sweep path checks); a per-family
    section contributes every family's fields."""
    out: list[str] = []
    for name in _user_fields(cls):
        field = cls.model_fields[name]
        path = f"{prefix}{name}"
        members = _tagged_members(field.annotation)
        subs = list(members.values()) if members else [s for s in [_model_at(cls, (name,))] if s is not None]
        if not subs:
            out.append(path)
        for sub in subs:
            out.extend(p for p in valid_paths(sub, path + ".") if p not in out)
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
        parts, _, tag = _walk(cls, loc)
        path = ".".join(parts)
        line = lines_for.get(path)
        where = f"{source}:{line}" if line else source
        kind = err["type"]
        if kind == "extra_forbidden":
            _, parent, tag = _walk(cls, loc[:-1])
            choices = _user_fields(parent) if parent else []
            key = str(loc[-1])
            if tag is not None and len(parts) == 2:  # a per-family section: say whose fields these are
                text = (f"not used by family {tag} (unknown key {key!r} in its {parts[0]} section"
                        f"{suggest(key, choices)}); {tag}'s {parts[0]} keys: {', '.join(choices) or 'none'}")
                readers = [t for t, c in _tagged_members(cls.model_fields[parts[0]].annotation).items()
                           if key in _user_fields(c)] if parts[0] in cls.model_fields else []
                if readers:
                    text += f"; read by family {', '.join(readers)}"
            else:
                text = f"unknown key {key!r}{suggest(key, choices)}"
                if choices:
                    text += f" (valid keys here: {', '.join(choices)})"
        else:
            text = err["msg"]
            if text.startswith("Value error, "):
                text = text[len("Value error, ") :]
            if kind not in ("value_error", "assertion_error") and "input" in err and not isinstance(err["input"], dict):
                text += f" (got {err['input']!r})"
            if err.get("input", "") is None and kind.endswith("_type"):
                text += ("; null does not reset a field here: leave it out for its default (switching family "
                         "with --set model.family=X drops the fields X does not read for you)")
        msgs.append(f"{where}: {path + ': ' if path else ''}{text}")
    return "\n".join(msgs)


def validate_as(cls: type[M], data: dict[str, Any], source: str) -> M:
    """Validate ``data`` as ``cls`` or raise SpecError with every problem listed."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(cls, exc, source)) from None
