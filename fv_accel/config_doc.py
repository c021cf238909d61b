"""Render the key tables of ``docs/configuration.md`` from the run configuration schema.

The docstring under each field of ``fv_accel/config.py`` (pydantic's ``use_attribute_docstrings``) is the one
source of a key's description; types, defaults and constraints come from the field declarations. The doc keeps
hand-written prose; only the blocks between ``<!-- BEGIN GENERATED: <section> -->`` and
``<!-- END GENERATED -->`` are rewritten. ``python -m fv_accel.config_doc --write`` regenerates them (``make
docs``); ``tests/test_config_doc.py`` fails when the committed doc differs.

Sections: the tree is split into one table per model reached from ``RunConfig`` through plain nested models
(``training.data``, ``callbacks.ema``, ...); a method (each registered method's ``Config``, by its ``name`` literal), a union member or the model
of a mapping (``models.<role>``) is one table, its own nested models flattened into it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from fv_accel.config import MethodConfigBase, RunConfig

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
WRITE_COMMAND = "python -m fv_accel.config_doc --write"

#: the placeholder a mapping's key is shown as (``models.<role>.init_from``); other mappings use ``<name>``
_MAPPING_PLACEHOLDERS = {"models": "<role>"}

_BLOCK = re.compile(r"<!-- BEGIN GENERATED: (?P<name>[^\s]+) -->\n(?P<body>.*?)<!-- END GENERATED -->", re.S)


@dataclass
class Row:
    key: str
    type: str
    default: str
    constraint: str
    description: str


@dataclass
class Section:
    name: str
    intro: str = ""
    rows: list[Row] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Walking the schema
# ---------------------------------------------------------------------------------------------------------


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_args(tp: Any) -> tuple[Any, ...]:
    tp = _strip_annotated(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(_strip_annotated(a) for a in typing.get_args(tp))
    return (tp,)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _model_of(tp: Any) -> tuple[type[BaseModel] | None, bool]:
    """(model, optional) when ``tp`` is a model or ``model | None``; (None, False) otherwise."""
    args = _union_args(tp)
    models = [a for a in args if _is_model(a)]
    rest = [a for a in args if not _is_model(a)]
    if len(models) == 1 and all(a is type(None) for a in rest):
        return models[0], bool(rest)
    return None, False


def _union_members(tp: Any) -> list[type[BaseModel]]:
    """The members of a union of two or more models, or the registered methods' ``Config`` classes for the
    ``method`` section (validated by its ``name``; ``fv_accel/methods/registry.py``), else []."""
    args = [a for a in _union_args(tp) if a is not type(None)]
    if args == [MethodConfigBase]:
        from fv_accel.methods.registry import METHODS

        return [METHODS[name].Config for name in sorted(METHODS)]
    return args if len(args) > 1 and all(_is_model(a) for a in args) else []


def _mapping_model(tp: Any) -> type[BaseModel] | None:
    tp = _strip_annotated(tp)
    if typing.get_origin(tp) is dict:
        value = _strip_annotated(typing.get_args(tp)[1])
        return value if _is_model(value) else None
    return None


def _tag(member: type[BaseModel], discriminator: str) -> str:
    """The literal value that selects a union member (``dmd2`` for ``name: Literal["dmd2"]``)."""
    info = member.model_fields.get(discriminator)
    values = typing.get_args(_strip_annotated(info.annotation)) if info is not None else ()
    if len(values) != 1:
        raise ValueError(f"{member.__name__}.{discriminator} must be a single Literal to document the union")
    return str(values[0])


def _default(info: FieldInfo, parent_default: BaseModel | None, name: str) -> tuple[bool, Any]:
    """(has_default, value). Inside a section whose default is an instance (``method.critic_optimizer``), the
    instance's values are the defaults, not the class's."""
    if parent_default is not None:
        return True, getattr(parent_default, name)
    if info.is_required():
        return False, None
    if info.default_factory is not None:
        return True, info.default_factory()  # type: ignore[call-arg]  # no factory here takes validated data
    return True, info.default


def _row(key: str, info: FieldInfo, has_default: bool, value: Any) -> Row:
    optional_section = _model_of(info.annotation)[1]
    return Row(key, _type(info.annotation), _render_default(has_default, value, optional_section),
               _constraint(info), _description(info))


def _split(model: type[BaseModel], prefix: str, default: BaseModel | None, intro: str,
           out: list[Section]) -> None:
    """One section for ``model``'s own leaf keys, then one per nested model, union member or mapping."""
    own = Section(prefix or "root", intro)
    out.append(own)
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        has_default, value = _default(info, default, name)
        members = _union_members(info.annotation)
        sub = _model_of(info.annotation)[0] if not members else None
        mapped = _mapping_model(info.annotation)
        if sub is not None:
            _split(sub, key, value if isinstance(value, BaseModel) else None, _description(info), out)
        elif members:
            discriminator = info.discriminator if isinstance(info.discriminator, str) else "name"
            # This package's methods only: a method registered by a test or a plugin is not part of this doc.
            for member in [m for m in members if m.__module__.split(".")[0] == "fv_accel"] or members:
                section = Section(f"{key}.{_tag(member, discriminator)}", _text(member.__doc__ or ""))
                out.append(section)
                _flatten(member, key, None, section)
        elif mapped is not None:
            section = Section(key, _description(info))
            out.append(section)
            _flatten(mapped, f"{key}.{_MAPPING_PLACEHOLDERS.get(name, '<name>')}", None, section)
        else:
            own.rows.append(_row(key, info, has_default, value))


def _flatten(model: type[BaseModel], prefix: str, default: BaseModel | None, section: Section) -> None:
    """Every key of ``model`` as a row of ``section``; a nested model's keys follow its own row."""
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}"
        has_default, value = _default(info, default, name)
        section.rows.append(_row(key, info, has_default, value))
        sub, mapped = _model_of(info.annotation)[0], _mapping_model(info.annotation)
        if sub is not None:
            _flatten(sub, key, value if isinstance(value, BaseModel) else None, section)
        elif mapped is not None:
            _flatten(mapped, f"{key}.<name>", None, section)


def sections(root: type[BaseModel] = RunConfig) -> list[Section]:
    """Every table of the schema under ``root``, in field order (sections without keys left out)."""
    out: list[Section] = []
    _split(root, "", None, "", out)
    return [s for s in out if s.rows]


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


def _text(doc: str) -> str:
    """A docstring as one Markdown line: ``code`` → `code`, lines joined."""
    return re.sub(r"``(.+?)``", r"`\1`", " ".join(doc.split()))


def _description(info: FieldInfo) -> str:
    return _text(info.description or "")


def _type(tp: Any) -> str:
    tp = _strip_annotated(tp)
    if tp is type(None):
        return "null"
    if _is_model(tp):
        return "section"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _render_default(has_default: bool, value: Any, optional_section: bool) -> str:
    if not has_default:
        return "**required**"
    if isinstance(value, BaseModel):
        return ""  # its keys follow, each with its default
    rendered = f"`{json.dumps(to_jsonable_python(value))}`"
    return f"{rendered} (off)" if optional_section and value is None else rendered


def _constraint(info: FieldInfo) -> str:
    bounds = [(annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
              (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<")]
    parts: list[str] = []
    min_len = max_len = None
    for meta in info.metadata:
        for kind, attr, op in bounds:
            if isinstance(meta, kind):
                parts.append(f"{op} {json.dumps(getattr(meta, attr))}")
        if isinstance(meta, annotated_types.MultipleOf):
            parts.append(f"multiple of {json.dumps(meta.multiple_of)}")
        if isinstance(meta, annotated_types.MinLen):
            min_len = meta.min_length
        if isinstance(meta, annotated_types.MaxLen):
            max_len = meta.max_length
    unit = "characters" if _strip_annotated(info.annotation) is str else "values"
    if min_len is not None and min_len == max_len:
        parts.append(f"{min_len} {unit}")
    elif min_len == 1 and max_len is None:
        parts.append("non-empty")
    else:
        if min_len is not None:
            parts.append(f"at least {min_len} {unit}")
        if max_len is not None:
            parts.append(f"at most {max_len} {unit}")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", r"\|")


def render_section(section: Section) -> str:
    """The body of one generated block: the section's description, then its key table."""
    lines = [section.intro, ""] if section.intro else []
    lines += ["| key | type | default | constraint | description |", "|---|---|---|---|---|"]
    for row in section.rows:
        cells = [f"`{row.key}`", _cell(row.type), row.default, row.constraint, _cell(row.description)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(doc: str | None = None, root: type[BaseModel] = RunConfig) -> str:
    """``doc`` (default: the committed ``docs/configuration.md``) with every generated block rewritten from the
    schema. A schema section without a block is appended after the last block under a heading of its own; a
    block naming no section of the schema is an error (rename or delete it in the doc)."""
    text = DOC_PATH.read_text() if doc is None else doc
    bodies = {s.name: render_section(s) for s in sections(root)}
    names = [m.group("name") for m in _BLOCK.finditer(text)]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    unknown = [n for n in names if n not in bodies]
    if duplicated or unknown:
        raise ValueError(f"{DOC_PATH.name}: generated blocks {duplicated} appear twice and {unknown} name no "
                         f"section of the schema (sections: {', '.join(bodies)})")
    text = _BLOCK.sub(lambda m: _block(m.group("name"), bodies[m.group("name")]), text)
    missing = [n for n in bodies if n not in names]
    if missing:
        added = "".join(f"\n\n### `{n}`\n\n{_block(n, bodies[n])}" for n in missing)
        last = list(_BLOCK.finditer(text))
        if last:
            text = text[: last[-1].end()] + added + text[last[-1].end():]
        else:
            text = text.rstrip("\n") + added + "\n"
    return text


def _block(name: str, body: str) -> str:
    return f"<!-- BEGIN GENERATED: {name} -->\n{body}<!-- END GENERATED -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fv_accel.config_doc",
                                     description="Render the key tables of docs/configuration.md from the schema.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {DOC_PATH} in place")
    mode.add_argument("--check", action="store_true", help="exit 1 when the committed doc is out of date")
    args = parser.parse_args(argv)
    current = DOC_PATH.read_text()
    new = render(current)
    if args.write:
        if new != current:
            DOC_PATH.write_text(new)
        print(f"{DOC_PATH}: {'updated' if new != current else 'up to date'}")
    elif args.check:
        if new != current:
            print(f"{DOC_PATH} is out of date: run {WRITE_COMMAND}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
