"""contract/rules.py on its own: each condition's Python test and JSON Schema agree, the
generated `allOf` and the validators agree, rules read only earlier fields, and `bounds`
hands another model the spec's own bounds. (That the API, its served schema and
`ddpm sample` all enforce them: tests/test_request_rules.py.)"""

from __future__ import annotations

import random
from typing import Annotated, Any

import jsonschema
import pytest
from pydantic import BaseModel, Field, ValidationError

from contract.limits import MAX_IMAGES, MAX_STEPS
from contract.rules import (
    RULE_FIELDS,
    RULES,
    AtLeast,
    Changed,
    Differs,
    Equals,
    Given,
    Null,
    Rule,
    bounds,
    check_rule_order,
    field_defaults,
    rules_schema,
)
from contract.spec import GenerationSpec

REF = "sha256:" + "1" * 64
VALUES: list[Any] = [None, 0, 0.0, 1, 1.0, 2, 2.5, -1, "png", "ddim", "x", REF, True]


@pytest.mark.parametrize("cond", [Given(), Null(), Changed(), Equals("ddim"), Equals(1),
                                  Differs("png"), AtLeast(2)], ids=repr)
@pytest.mark.parametrize("default", [None, 1, 10, "dpm++2m"])
def test_a_conditions_schema_is_its_python_test(cond: Any, default: Any) -> None:
    """For every value a body can give, the JSON Schema matches exactly when `holds` does
    (numbers only where the condition is about numbers: the field's own type refuses the
    rest first)."""
    schema = jsonschema.Draft202012Validator(cond.schema(default))
    for value in VALUES:
        if isinstance(cond, AtLeast) and not isinstance(value, int | float):
            continue
        if isinstance(value, bool):             # JSON's true is not 1 (strict fields)
            continue
        assert schema.is_valid(value) == cond.holds(value, default), (cond, default, value)


def test_the_generated_all_of_is_the_validators_on_random_bodies() -> None:
    """Many bodies mixing every field a rule reads, values on both sides of each
    condition and left out: the `allOf` accepts exactly those the validators accept."""
    validator = jsonschema.Draft202012Validator({"allOf": rules_schema(GenerationSpec)})
    choices: dict[str, list[Any]] = {
        "guidance_scale": [1, 1.0, 2.0, 0.0], "class_label": [None, 0, 3],
        "eta": [0, 0.0, 0.5], "sampler": ["ddim", "ddpm", "dpm++2m"],
        "snapshot_format": [None, "png", "jpeg"], "snapshot_quality": [None, 50],
        "init_image": [None, REF], "mask": [None, REF], "interpolate_to": [None, REF],
        "strength": [None, 0.5], "num_images": [1, 2, 3], "jump_length": [10, 3],
        "jump_n_sample": [1, 2]}
    assert {r.field for r in RULES} | {r.other for r in RULES} <= set(choices)
    rng = random.Random(0)
    refused = 0
    for _ in range(20_000):
        body = {"model": "m", **{k: rng.choice(v) for k, v in choices.items()
                                 if rng.random() < 0.5}}
        try:
            GenerationSpec.model_validate(body)
            ok = True
        except ValidationError:
            ok = False
            refused += 1
        assert validator.is_valid(body) == ok, body
    assert 2_000 < refused < 18_000            # both answers are well represented


def test_a_broken_rule_names_its_field_with_its_message() -> None:
    with pytest.raises(ValidationError) as err:
        GenerationSpec(model="m", sampler="ddpm", eta=0.5)
    (e,) = err.value.errors()
    assert e["loc"] == ("eta",)
    assert e["msg"] == "Value error, eta applies to the ddim sampler only, not 'ddpm'"


def test_a_rule_is_not_judged_when_its_other_field_is_itself_invalid() -> None:
    """sampler is refused; eta's rule (which reads it) says nothing more."""
    with pytest.raises(ValidationError) as err:
        GenerationSpec.model_validate({"model": "m", "sampler": "euler", "eta": 0.5})
    assert [e["loc"] for e in err.value.errors()] == [("sampler",)]


def test_every_rule_field_has_the_validator() -> None:
    assert set(RULE_FIELDS) == {r.field for r in RULES}
    validators = GenerationSpec.__pydantic_decorators__.field_validators
    assert set(validators["_rules"].info.fields) == set(RULE_FIELDS)


def test_rules_read_only_fields_declared_before_them() -> None:
    """A field validator sees earlier fields only: a rule reading a later one would never
    fire. check_rule_order refuses such a model (GenerationSpec passes it at import)."""
    check_rule_order(GenerationSpec)

    class Reordered(BaseModel):          # class_label after guidance_scale's rule reads it
        model: str
        num_images: int = 1
        sampler: str = "ddim"
        eta: float = 0.0
        snapshot_format: str | None = None
        snapshot_quality: int | None = None
        guidance_scale: float = 1.0
        init_image: str | None = None
        mask: str | None = None
        interpolate_to: str | None = None
        strength: float | None = None
        jump_length: int = 10
        jump_n_sample: int = 1
        class_label: int | None = None

    with pytest.raises(AssertionError, match="class_label must be declared before"):
        check_rule_order(Reordered)


def test_schema_descriptions_name_values_by_field() -> None:
    rule = Rule("eta", Changed(), "sampler", Equals("ddim"), "not {sampler!r}")
    assert rule.schema(field_defaults(GenerationSpec))["description"] == "not '<sampler>'"


def test_bounds_are_the_fields_own() -> None:
    assert bounds(GenerationSpec, "steps") == {"ge": 1, "le": MAX_STEPS}
    assert bounds(GenerationSpec, "num_images") == {"ge": 1, "le": MAX_IMAGES}
    assert bounds(GenerationSpec, "strength") == {"gt": 0.0, "le": 1.0}
    assert bounds(GenerationSpec, "sampler") == {}


def test_bounds_bound_another_model_alike() -> None:
    """`Field(**bounds(...))` on another model (the OpenAI routes' optional fields) accepts
    and refuses what the spec does, at and past each end."""

    class Other(BaseModel):
        steps: Annotated[int | None, Field(**bounds(GenerationSpec, "steps"))] = None
        strength: Annotated[float | None, Field(**bounds(GenerationSpec, "strength"))] = None

    for name, values in (("steps", [0, 1, MAX_STEPS, MAX_STEPS + 1]),
                         ("strength", [0.0, 1e-6, 1.0, 1.01])):
        for v in values:
            try:
                GenerationSpec.model_validate({"model": "m", "init_image": REF, name: v})
                spec_ok = True
            except ValidationError:
                spec_ok = False
            try:
                Other.model_validate({name: v})
                other_ok = True
            except ValidationError:
                other_ok = False
            assert spec_ok == other_ok, (name, v)
