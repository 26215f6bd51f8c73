"""server/api/tools/strict.py: OpenAI's strict-schema rules on pydantic-generated and
hand-written schemas; every refusal names its keyword and JSON path."""

from __future__ import annotations

import copy
import enum
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from adapterserve.server.api.tools.strict import (
    MAX_ENUM_VALUES,
    MAX_NESTING,
    MAX_PROPERTIES,
    STRICT_UNSUPPORTED,
    StrictSchemaError,
    strict_schema,
)


class Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    zip: str | None = None


class Person(BaseModel):
    name: str
    age: int = 0
    address: Address
    previous: list[Address]
    color: Color
    nickname: str | None = None


def objects(schema: Any) -> list[dict]:
    """Every object schema in `schema`, wherever it is."""
    found = []
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            found.append(schema)
        for value in schema.values():
            found += objects(value)
    elif isinstance(schema, list):
        for value in schema:
            found += objects(value)
    return found


def test_pydantic_schema_every_object_closed_and_fully_required():
    original = Person.model_json_schema()
    before = copy.deepcopy(original)
    strict = strict_schema(original)
    assert original == before  # a new schema; the input is untouched
    assert len(objects(strict)) == 2  # Person and $defs.Address
    for node in objects(strict):
        assert node["additionalProperties"] is False
        assert node["required"] == list(node["properties"])
    assert strict["$defs"]["Address"]["required"] == ["street", "zip"]
    assert strict["properties"]["address"] == {"$ref": "#/$defs/Address"}  # refs kept
    assert strict["$defs"]["Color"] == original["$defs"]["Color"]  # an enum is no object


def test_strict_pydantic_schema_validates_what_it_should():
    strict = strict_schema(Person.model_json_schema())
    address = {"street": "Main", "zip": None}
    good = {
        "name": "a",
        "age": 1,
        "address": address,
        "previous": [address],
        "color": "red",
        "nickname": None,
    }
    jsonschema.validate(good, strict)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({k: v for k, v in good.items() if k != "age"}, strict)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**good, "extra": 1}, strict)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**good, "address": {**address, "extra": 1}}, strict)


def test_nested_objects_in_items_anyof_and_definitions():
    schema = {
        "type": "object",
        "properties": {
            "rows": {"type": "array", "items": {"type": "object", "properties": {"a": {}}}},
            "either": {"anyOf": [{"type": "object", "properties": {"b": {}}}, {"type": "null"}]},
            "nested": {"type": ["object", "null"], "properties": {"c": {"type": "object"}}},
        },
        "definitions": {"D": {"type": "object", "properties": {"d": {"$ref": "#"}}}},
    }
    strict = strict_schema(schema)
    assert strict["properties"]["rows"]["items"]["required"] == ["a"]
    assert strict["properties"]["either"]["anyOf"][0]["additionalProperties"] is False
    assert strict["properties"]["nested"]["properties"]["c"] == {
        "type": "object",
        "additionalProperties": False,
        "required": [],
        "properties": {},
    }
    assert strict["definitions"]["D"]["required"] == ["d"]
    assert strict["required"] == ["rows", "either", "nested"]


def test_already_strict_schema_is_unchanged():
    schema = {
        "type": "object",
        "properties": {"x": {"type": ["string", "null"]}},
        "required": ["x"],
        "additionalProperties": False,
    }
    assert strict_schema(schema) == schema


@pytest.mark.parametrize("keyword", STRICT_UNSUPPORTED)
def test_each_unsupported_keyword_is_refused_with_its_path(keyword: str):
    schema = {"type": "object", "properties": {"x": {"type": "string", keyword: {}}}}
    with pytest.raises(StrictSchemaError) as error:
        strict_schema(schema)
    assert str(error.value) == f"strict mode does not support {keyword!r} at $.properties.x"


def test_refusal_paths_reach_lists_and_definitions():
    schema = {
        "type": "object",
        "properties": {"y": {"anyOf": [{}, {"allOf": []}]}},
        "$defs": {"Z": {"type": "array", "items": {"uniqueItems": True}}},
    }
    with pytest.raises(StrictSchemaError, match=r"'allOf' at \$\.properties\.y\.anyOf\[1\]$"):
        strict_schema(schema)
    del schema["properties"]["y"]
    with pytest.raises(StrictSchemaError, match=r"'uniqueItems' at \$\.\$defs\.Z\.items$"):
        strict_schema(schema)


@pytest.mark.parametrize("extra", [True, {"type": "string"}, {}])
def test_additional_properties_other_than_false_is_refused(extra: Any):
    schema = {
        "type": "object",
        "properties": {"m": {"type": "object", "additionalProperties": extra}},
    }
    with pytest.raises(StrictSchemaError, match=r"'additionalProperties' .* at \$\.properties\.m$"):
        strict_schema(schema)


def test_dict_field_of_pydantic_is_refused():
    class Tags(BaseModel):
        tags: dict[str, str]

    with pytest.raises(StrictSchemaError, match="additionalProperties"):
        strict_schema(Tags.model_json_schema())


@pytest.mark.parametrize(
    "root",
    [
        {"type": "array", "items": {}},
        {"type": "string"},
        {"anyOf": [{"type": "object"}, {"type": "null"}]},
        {"$ref": "#/$defs/A", "$defs": {"A": {"type": "object"}}},
    ],
)
def test_root_must_be_an_object_and_not_anyof(root: dict):
    with pytest.raises(StrictSchemaError, match=r"root|at \$$"):
        strict_schema(root)


def test_nesting_limit():
    def nest(levels: int) -> dict:
        node: dict = {"type": "object", "properties": {}}
        for _ in range(levels - 1):
            node = {"type": "object", "properties": {"n": node}}
        return node

    strict_schema(nest(MAX_NESTING))
    with pytest.raises(StrictSchemaError, match=f"at most {MAX_NESTING} levels .* got 11 at"):
        strict_schema(nest(MAX_NESTING + 1))


def test_property_and_enum_limits():
    many = {f"p{i}": {"type": "string"} for i in range(MAX_PROPERTIES + 1)}
    with pytest.raises(StrictSchemaError, match=f"at most {MAX_PROPERTIES} object properties"):
        strict_schema({"type": "object", "properties": many})
    values = list(range(MAX_ENUM_VALUES + 1))
    with pytest.raises(StrictSchemaError, match=f"at most {MAX_ENUM_VALUES} enum values"):
        strict_schema({"type": "object", "properties": {"e": {"enum": values}}})
