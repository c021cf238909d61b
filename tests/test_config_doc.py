"""docs/configuration.md's key tables are generated from the schema (fv_accel/config_doc.py) and stay so."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from fv_accel.config import RunConfig
from fv_accel.config_doc import DOC_PATH, WRITE_COMMAND, render, render_section, sections

_BLOCK = re.compile(r"<!-- BEGIN GENERATED: \S+ -->\n(.*?)<!-- END GENERATED -->", re.S)


def test_committed_doc_is_regenerated() -> None:
    committed = DOC_PATH.read_text()
    fresh = render(committed)
    diff = "".join(list(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                             "committed", "generated"))[:40])
    assert fresh == committed, f"docs/configuration.md is stale: run {WRITE_COMMAND}\n{diff}"


def _schema_keys() -> dict[str, str | None]:
    """Every dotted key of RunConfig from pydantic's JSON schema (a walk independent of config_doc): leaf keys
    map to their description, section keys to the marker "<section>"; a mapping's key is ``*``. ``method`` is
    validated as the Config of the registered method its name selects: each Config's own schema is walked."""
    from fv_accel.methods.registry import METHODS

    schema = RunConfig.model_json_schema()
    defs = dict(schema.get("$defs", {}))
    method_refs = []
    for cls in METHODS.values():
        if cls.__module__.split(".")[0] != "fv_accel":
            continue  # a method a test or a plugin registered is not part of this package's doc
        sub = cls.Config.model_json_schema()
        defs.update(sub.pop("$defs", {}))
        defs[cls.Config.__name__] = sub
        method_refs.append({"$ref": f"#/$defs/{cls.Config.__name__}"})
    schema["properties"]["method"] = {"anyOf": method_refs}

    def objects(node: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if "$ref" in node:
            return objects(defs[node["$ref"].rsplit("/", 1)[-1]])
        if "properties" in node:
            return [("", node)]
        found = [o for alt in node.get("anyOf", []) + node.get("oneOf", []) + node.get("allOf", [])
                 for o in objects(alt)]
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            found += [(".*" + seg, obj) for seg, obj in objects(extra)]
        return found

    keys: dict[str, str | None] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, prop in node["properties"].items():
            key = prefix + name
            subs = objects(prop)
            keys[key] = "<section>" if subs else prop.get("description")
            for seg, obj in subs:
                walk(obj, key + seg + ".")

    walk(schema, "")
    return keys


def _doc_keys() -> set[str]:
    rows = [line for block in _BLOCK.findall(DOC_PATH.read_text()) for line in block.splitlines()]
    return {re.sub(r"<[^>]+>", "*", m.group(1)) for line in rows if (m := re.match(r"\| `([^`]+)` \|", line))}


def test_every_schema_key_is_in_the_doc() -> None:
    schema, doc = _schema_keys(), _doc_keys()
    leaves = {k for k, v in schema.items() if v != "<section>"}
    assert {"models.*.init_from", "method.critic_optimizer.learning_rate", "callbacks.ema.decay",
            "training.loop.max_train_steps", "hub.private"} <= leaves  # the walk reaches every kind of nesting
    assert sorted(leaves - doc) == [], f"keys missing from docs/configuration.md: run {WRITE_COMMAND}"
    assert sorted(doc - set(schema)) == [], "docs/configuration.md documents keys the schema does not have"


def test_every_key_has_a_docstring() -> None:
    undocumented = sorted(k for k, v in _schema_keys().items() if not v)
    assert undocumented == [], f"add a docstring under these fields in the schema: {undocumented}"


def test_critic_optimizer_defaults_come_from_its_factory() -> None:
    # the critic's OptimizerConfig instance (lr 4e-5, beta1 0), not OptimizerConfig's class defaults
    rows = {r.key: r for s in sections() for r in s.rows}
    assert rows["method.critic_optimizer.learning_rate"].default == "`4e-05`"
    assert rows["method.critic_optimizer.betas"].default == "`[0.0, 0.999]`"
    assert rows["training.optimizer.learning_rate"].default == "`0.0001`"


# A tiny schema with one of each shape, and its tables written out by hand.


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class _Opt(_Base):
    lr: float = Field(1e-3, gt=0)
    """Step size | in ``units``."""
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.99], min_length=2, max_length=2)
    """Betas."""


class _A(_Base):
    """Method A."""

    name: Literal["a"]
    """Picks A."""
    opt: _Opt = Field(default_factory=lambda: _Opt(lr=0.5))
    """A's
    optimizer."""


class _B(_Base):
    """Method B."""

    name: Literal["b"]
    """Picks B."""
    k: int = Field(2, ge=1, le=8)
    """Count."""


class _Sub(_Base):
    tag: str = Field("x", min_length=1)
    """Tag."""
    mode: Literal["p", "q"] | None = None
    """Mode."""


class _Root(_Base):
    roles: dict[str, _Sub]
    """Roles."""
    method: Annotated[_A | _B, Field(discriminator="name")]
    """Method."""
    extra: _Sub | None = None
    """Extra, off."""
    top: bool = True
    """Top flag."""


_HEAD = "| key | type | default | constraint | description |\n|---|---|---|---|---|\n"
_EXPECTED = {
    "root": _HEAD + "| `top` | bool | `true` |  | Top flag. |\n",
    "roles": "Roles.\n\n" + _HEAD
    + '| `roles.<name>.tag` | str | `"x"` | non-empty | Tag. |\n'
    + '| `roles.<name>.mode` | "p" \\| "q" \\| null | `null` |  | Mode. |\n',
    "method.a": "Method A.\n\n" + _HEAD
    + '| `method.name` | "a" | **required** |  | Picks A. |\n'
    + "| `method.opt` | section |  |  | A's optimizer. |\n"
    + "| `method.opt.lr` | float | `0.5` | > 0 | Step size \\| in `units`. |\n"
    + "| `method.opt.betas` | list[float] | `[0.9, 0.99]` | 2 values | Betas. |\n",
    "method.b": "Method B.\n\n" + _HEAD
    + '| `method.name` | "b" | **required** |  | Picks B. |\n'
    + "| `method.k` | int | `2` | >= 1, <= 8 | Count. |\n",
    "extra": "Extra, off.\n\n" + _HEAD
    + '| `extra.tag` | str | `"x"` | non-empty | Tag. |\n'
    + '| `extra.mode` | "p" \\| "q" \\| null | `null` |  | Mode. |\n',
}


def test_sections_of_a_small_schema() -> None:
    rendered = {s.name: render_section(s) for s in sections(_Root)}
    assert list(rendered) == ["root", "roles", "method.a", "method.b", "extra"]
    assert rendered == _EXPECTED


def test_render_rewrites_only_blocks_and_appends_missing_sections() -> None:
    doc = ("# T\n\nhand text\n\n<!-- BEGIN GENERATED: method.b -->\nstale\n<!-- END GENERATED -->\n\n"
           "more hand text\n<!-- BEGIN GENERATED: root -->\n<!-- END GENERATED -->\n\n## Tail\n")
    out = render(doc, root=_Root)

    def block(name: str) -> str:
        return f"<!-- BEGIN GENERATED: {name} -->\n{_EXPECTED[name]}<!-- END GENERATED -->"

    appended = "".join(f"\n\n### `{n}`\n\n{block(n)}" for n in ("roles", "method.a", "extra"))
    assert out == ("# T\n\nhand text\n\n" + block("method.b") + "\n\nmore hand text\n" + block("root")
                   + appended + "\n\n## Tail\n")
    assert render(out, root=_Root) == out


def test_render_refuses_a_block_the_schema_does_not_have() -> None:
    with pytest.raises(ValueError, match=r"\['training.bogus'\] name no section"):
        render("<!-- BEGIN GENERATED: training.bogus -->\n<!-- END GENERATED -->\n")
