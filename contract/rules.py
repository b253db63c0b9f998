"""The rules between a request's fields, stated once.

Each rule says: when field F's value is so (given, or changed from its default), another
field G must be so (given, null, a value, at least n). One tuple of them, `RULES`, drives

- the validators of `GenerationSpec` (`check_rule`, from a `field_validator` on F, so the
  API's 422 and `ddpm sample`'s refusal name F with the rule's message),
- the request schemas' OpenAPI `allOf` (`rules_schema`: JSON Schema 2020-12 `if`/`then`),
  so clients and fuzzers see what the validators enforce, and
- `ddpm sample`, which validates the same `GenerationSpec` built from its flags.

Bounds of single fields are not rules: they stay on the pydantic fields (`Field(ge=, le=)`),
read back by `bounds` (the OpenAI routes' fields, `ddpm sample`'s help). Rules that depend
on the model (steps past its T, a class it lacks) are `GenerationSpec.check_model`'s. A
rule reads only fields declared before F (pydantic validates in declaration order;
`check_rule_order` says so at import).

Torch-free and pydantic-only: the API imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

# ---------------------------------------------------------------------------------------
# Conditions on one field's value. `holds` is the Python test; `schema` the JSON Schema a
# present value must match for it to hold.


@dataclass(frozen=True)
class Given:
    """The value is not null."""

    def holds(self, value: Any, default: Any) -> bool:
        return value is not None

    def schema(self, default: Any) -> dict[str, Any]:
        return {"not": {"type": "null"}}


@dataclass(frozen=True)
class Null:
    """The value is null (or left out, where null is the default)."""

    def holds(self, value: Any, default: Any) -> bool:
        return value is None

    def schema(self, default: Any) -> dict[str, Any]:
        return {"type": "null"}


@dataclass(frozen=True)
class Changed:
    """The value differs from the field's default."""

    def holds(self, value: Any, default: Any) -> bool:
        return bool(value != default)

    def schema(self, default: Any) -> dict[str, Any]:
        return {"not": {"const": default}}


@dataclass(frozen=True)
class Equals:
    """The value is `value`."""

    value: Any

    def holds(self, value: Any, default: Any) -> bool:
        return bool(value == self.value)

    def schema(self, default: Any) -> dict[str, Any]:
        return {"const": self.value}


@dataclass(frozen=True)
class Differs:
    """The value is not `value` (null is not it)."""

    value: Any

    def holds(self, value: Any, default: Any) -> bool:
        return bool(value != self.value)

    def schema(self, default: Any) -> dict[str, Any]:
        return {"not": {"const": self.value}}


@dataclass(frozen=True)
class AtLeast:
    """The value is a number ≥ `least`."""

    least: int | float

    def holds(self, value: Any, default: Any) -> bool:
        return value is not None and value >= self.least

    def schema(self, default: Any) -> dict[str, Any]:
        return {"type": "number", "minimum": self.least}


Condition = Given | Null | Changed | Equals | Differs | AtLeast


@dataclass(frozen=True)
class Rule:
    """When `field` meets `when`, `other` must meet `needs`; else a refusal naming `field`
    with `message` (formatted with the fields' values by name, e.g. `{sampler!r}`)."""

    field: str
    when: Condition
    other: str
    needs: Condition
    message: str

    def breaks(self, value: Any, other: Any, defaults: Mapping[str, Any]) -> bool:
        """Whether `field` at `value` and `other` at `other` break this rule."""
        return self.when.holds(value, defaults[self.field]) \
            and not self.needs.holds(other, defaults[self.other])

    def broken(self, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> bool:
        """Whether `values` (every field's value, defaults filled in) break this rule."""
        return self.breaks(values[self.field], values[self.other], defaults)

    def schema(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The rule as JSON Schema `if`/`then`: a body meets a condition on a field when it
        gives a value that meets it, or leaves the field out and its default meets it."""
        return {"description": self.message.format_map(_Placeholders()),
                "if": _meets(self.field, self.when, defaults[self.field]),
                "then": _meets(self.other, self.needs, defaults[self.other])}


def _meets(field: str, cond: Condition, default: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"properties": {field: cond.schema(default)}}
    if not cond.holds(default, default):
        schema = {"required": [field], **schema}
    return schema


class _Placeholders(dict[str, str]):
    """Rule messages as schema descriptions: a value named in a message reads `<field>`."""

    def __missing__(self, key: str) -> str:
        return f"<{key}>"


# ---------------------------------------------------------------------------------------
# The rules. Order: the order the validators of one field try them.

RULES: tuple[Rule, ...] = (
    Rule("eta", Changed(), "sampler", Equals("ddim"),
         "eta applies to the ddim sampler only, not {sampler!r}"),
    Rule("guidance_scale", Changed(), "class_label", Given(),
         "guidance_scale needs a class_label (classifier-free guidance)"),
    Rule("snapshot_quality", Given(), "snapshot_format", Differs("png"),
         "snapshot_quality applies to webp and jpeg frames, not png"),
    *(Rule(f, Given(), "init_image", Given(), f"{f} needs an init_image")
      for f in ("mask", "interpolate_to", "strength")),
    Rule("interpolate_to", Given(), "mask", Null(),
         "interpolate_to and mask exclude each other"),
    Rule("interpolate_to", Given(), "num_images", AtLeast(2),
         "an interpolation needs num_images >= 2 (its frames)"),
    *(Rule(f, Changed(), "mask", Given(), f"{f} applies to inpainting (a mask) only")
      for f in ("jump_length", "jump_n_sample")),
)
# The fields whose validators check rules (each rule is checked on its `field`).
RULE_FIELDS: tuple[str, ...] = tuple(dict.fromkeys(r.field for r in RULES))


# ---------------------------------------------------------------------------------------
# What the models do with them.


@cache
def field_defaults(model: type[BaseModel]) -> Mapping[str, Any]:
    """Each field's default (None where it has a factory or none: no rule reads those).
    Read once per model: every validation of a spec asks (the worker validates each job)."""
    return MappingProxyType({name: None if f.default is PydanticUndefined else f.default
                             for name, f in model.model_fields.items()})


@cache
def _rules_on(field: str) -> tuple[Rule, ...]:
    return tuple(r for r in RULES if r.field == field)


def check_rule(model: type[BaseModel], field: str, value: Any,
               earlier: Mapping[str, Any]) -> None:
    """ValueError with the message of the first rule on `field` that `value` breaks, given
    the fields validated before it (`earlier`: pydantic's `info.data`). A rule whose other
    field failed its own validation (absent from `earlier`) is not judged: that field's
    error is the one reported."""
    defaults = field_defaults(model)
    for rule in _rules_on(field):
        if rule.other in earlier and rule.breaks(value, earlier[rule.other], defaults):
            raise ValueError(rule.message.format_map({**earlier, field: value}))


def rules_schema(model: type[BaseModel]) -> list[dict[str, Any]]:
    """`RULES` as the `allOf` of `model`'s JSON Schema (its fields' defaults filled in)."""
    defaults = field_defaults(model)
    return [rule.schema(defaults) for rule in RULES]


def check_rule_order(model: type[BaseModel]) -> None:
    """AssertionError unless every rule's other field is declared before its field (what
    a field validator can read), and both are fields of `model`."""
    order = list(model.model_fields)
    for rule in RULES:
        assert rule.field in order and rule.other in order, rule
        assert order.index(rule.other) < order.index(rule.field), (
            f"{rule.other} must be declared before {rule.field} for the rule {rule.message!r}")


def bounds(model: type[BaseModel], field: str) -> dict[str, Any]:
    """The bounds of a number field of `model` as `Field` keywords (`ge`, `gt`, `le`,
    `lt`), read from its `Field(...)` metadata: `Field(**bounds(GenerationSpec, "steps"))`
    bounds another model's field alike, and the CLI's help states them, without
    restating a number."""
    out: dict[str, Any] = {}
    for m in model.model_fields[field].metadata:
        for kind in (Ge, Gt, Le, Lt):
            if isinstance(m, kind):
                name = kind.__name__.lower()
                out[name] = getattr(m, name)
    return out
