"""OpenAI's strict mode for JSON schemas (`"strict": true` on a function or a json_schema
response format), as OpenAI's structured-outputs guide documents it ("Supported schemas"):

- every object schema, wherever it is (root, properties, items, anyOf branches, $defs), gets
  `additionalProperties: false` and lists every one of its properties in `required`; a field is
  optional only through a nullable type (`"type": ["string", "null"]`), which is the client's
  business;
- the root is an object schema, not an anyOf;
- keywords strict mode does not support are refused, never silently dropped (STRICT_UNSUPPORTED);
- `additionalProperties` may only be false;
- at most MAX_NESTING levels of nested objects, MAX_PROPERTIES properties in all, MAX_ENUM_VALUES
  enum values in all, and MAX_TEXT_CHARS characters of property names, definition names, enum
  and const values.

`$ref` (to `#/$defs/...`, `#/definitions/...` or `#` for recursion) is kept as it is; the
definitions themselves are made strict like any other schema. Nesting is counted in the schema
as written: a definition starts again at level 1 where it is defined, not where it is used.

The input has passed server/api/jsontext.py's depth limit (64), so the recursive walk is safe.
"""

from __future__ import annotations

import copy
from typing import Any

MAX_NESTING = 10
MAX_PROPERTIES = 5000
MAX_ENUM_VALUES = 1000
MAX_TEXT_CHARS = 120_000

# OpenAI, "Supported schemas": composition (allOf, not, if/then/else, dependentRequired,
# dependentSchemas), object (patternProperties, unevaluatedProperties, propertyNames,
# minProperties, maxProperties) and array keywords (unevaluatedItems, contains, minContains,
# maxContains, uniqueItems) are not supported. oneOf and the draft-7 `dependencies` are refused
# too: OpenAI answers them with "not permitted" (anyOf is the supported alternative).
STRICT_UNSUPPORTED = (
    "allOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "patternProperties",
    "unevaluatedProperties",
    "propertyNames",
    "minProperties",
    "maxProperties",
    "unevaluatedItems",
    "contains",
    "minContains",
    "maxContains",
    "uniqueItems",
)

# keyword -> how its value holds subschemas: "one" schema, a "list" or a "map" of them
SUBSCHEMAS = {
    "items": "one",
    "anyOf": "list",
    "prefixItems": "list",
    "properties": "map",
    "$defs": "map",
    "definitions": "map",
}


class StrictSchemaError(ValueError):
    """A schema strict mode cannot take; the message names the keyword and its JSON path."""


class _Budget:
    """Totals over the whole schema, checked against OpenAI's limits as the walk goes."""

    def __init__(self) -> None:
        self.properties = 0
        self.enum_values = 0
        self.text_chars = 0

    def add(self, properties: int = 0, enum_values: int = 0, text: int = 0, path: str = "$"):
        self.properties += properties
        self.enum_values += enum_values
        self.text_chars += text
        for what, total, limit in (
            ("object properties", self.properties, MAX_PROPERTIES),
            ("enum values", self.enum_values, MAX_ENUM_VALUES),
            ("characters of names and enum/const values", self.text_chars, MAX_TEXT_CHARS),
        ):
            if total > limit:
                raise StrictSchemaError(
                    f"strict mode allows at most {limit} {what} in a schema, got {total} at {path}"
                )


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A new schema: `schema` under OpenAI's strict rules (module docstring). The input is not
    modified. Raises StrictSchemaError for what strict mode refuses."""
    if not isinstance(schema, dict):
        raise StrictSchemaError(
            f"strict mode requires a schema object, got {type(schema).__name__} at $"
        )
    if "anyOf" in schema:
        raise StrictSchemaError("strict mode does not support 'anyOf' at the root, at $")
    if not _is_object(schema):
        raise StrictSchemaError(
            f"strict mode requires the root schema to be an object, got type "
            f"{schema.get('type')!r} at $"
        )
    result = copy.deepcopy(schema)
    _make_strict(result, "$", 0, _Budget())
    return result


def _is_object(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in node


def _make_strict(node: Any, path: str, depth: int, budget: _Budget) -> None:
    """Make `node` (a copy) strict in place; `depth` counts the objects around it."""
    if not isinstance(node, dict):
        return  # a boolean schema or a malformed one: llguidance judges it
    for keyword in STRICT_UNSUPPORTED:
        if keyword in node:
            raise StrictSchemaError(f"strict mode does not support {keyword!r} at {path}")
    _count_values(node, path, budget)
    if _is_object(node):
        depth += 1
        _close_object(node, path, depth, budget)
    for keyword, shape in SUBSCHEMAS.items():
        if keyword in node:
            _walk_subschemas(node[keyword], shape, f"{path}.{keyword}", depth, budget)


def _close_object(node: dict[str, Any], path: str, depth: int, budget: _Budget) -> None:
    if depth > MAX_NESTING:
        raise StrictSchemaError(
            f"strict mode allows at most {MAX_NESTING} levels of nested objects, got {depth} at {path}"
        )
    extra = node.get("additionalProperties", False)
    if extra is not False:
        raise StrictSchemaError(
            f"strict mode does not support 'additionalProperties' other than false "
            f"(got {extra!r}) at {path}"
        )
    properties = node.get("properties", {})
    if not isinstance(properties, dict):
        raise StrictSchemaError(f"'properties' must be an object at {path}.properties")
    node["additionalProperties"] = False
    node["required"] = list(properties)
    node.setdefault("properties", {})
    budget.add(properties=len(properties), text=sum(map(len, properties)), path=path)


def _count_values(node: dict[str, Any], path: str, budget: _Budget) -> None:
    enum = node.get("enum")
    if isinstance(enum, list):
        budget.add(enum_values=len(enum), text=sum(len(str(v)) for v in enum), path=path)
    if "const" in node:
        budget.add(text=len(str(node["const"])), path=path)
    for keyword in ("$defs", "definitions"):
        if isinstance(node.get(keyword), dict):
            budget.add(text=sum(map(len, node[keyword])), path=path)


def _walk_subschemas(value: Any, shape: str, path: str, depth: int, budget: _Budget) -> None:
    if shape == "one" and isinstance(value, dict):
        _make_strict(value, path, depth, budget)
    elif shape == "list" and isinstance(value, list):
        for index, item in enumerate(value):
            _make_strict(item, f"{path}[{index}]", depth, budget)
    elif shape == "map" and isinstance(value, dict):
        # a definition is a schema of its own: its nesting starts again where it is defined
        restart = path.endswith((".$defs", ".definitions"))
        for key, item in value.items():
            _make_strict(item, f"{path}.{key}", 0 if restart else depth, budget)
