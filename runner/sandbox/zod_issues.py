"""Argument validation as the real gateway answers it: the tool's JSON Schema checked with `jsonschema`
(draft-07, formats as zod 3 checks them), failures reported as zod 3 issues.

Facts (services/mana-mcp, @modelcontextprotocol/sdk 1.29, zod 3.25): the SDK parses the arguments
with the registry's zod object *before* the handler; zod drops unknown keys (strip mode) whatever
the served `additionalProperties: false` says; defaults fill missing keys; a failure becomes the
error result `MCP error -32602: Input validation error: Invalid arguments for tool <name>: ` +
`ZodError.message`, which is `JSON.stringify(issues, null, 2)`. The issue objects below copy
zod 3's key order (it matters for the text) and its default messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from jsonschema import Draft7Validator, FormatChecker, ValidationError

# zod 3's own regexes: its uuid accepts any version nibble, its datetime() only a `Z` offset.
_UUID = re.compile(r"^[0-9a-fA-F]{8}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{12}$")
_DATE = (
    r"((\d\d[2468][048]|\d\d[13579][26]|\d\d0[48]|[02468][048]00|[13579][26]00)-02-29|\d{4}-((0[13578]|1[02])-"
    r"(0[1-9]|[12]\d|3[01])|(0[469]|11)-(0[1-9]|[12]\d|30)|(02)-(0[1-9]|1\d|2[0-8])))"
)
_DATETIME = re.compile(rf"^{_DATE}T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?Z$")

FORMATS = FormatChecker(formats=())


@FORMATS.checks("uuid")
def _is_uuid(value: object) -> bool:
    return not isinstance(value, str) or _UUID.fullmatch(value) is not None


@FORMATS.checks("date-time")
def _is_datetime(value: object) -> bool:
    return not isinstance(value, str) or _DATETIME.fullmatch(value) is not None


def validator(schema: dict[str, Any]) -> Draft7Validator:
    return Draft7Validator(schema, format_checker=FORMATS)


def strip_and_default(schema: dict[str, Any], arguments: dict[str, Any]) -> dict[str, Any]:
    """What the handler receives: known keys only, defaults filled in (zod's strip + .default())."""
    properties: dict[str, Any] = schema.get("properties") or {}
    if not properties and "additionalProperties" not in schema:
        return dict(arguments)  # registered without a shape: the SDK passes arguments through
    parsed = {key: value for key, value in arguments.items() if key in properties}
    for key, prop in properties.items():
        if key not in parsed and isinstance(prop, dict) and "default" in prop:
            parsed[key] = prop["default"]
    return parsed


def validation_error_text(tool: str, schema: dict[str, Any], arguments: Any) -> str | None:
    """The gateway's error text for arguments its schema refuses, None when they pass."""
    if not (schema.get("properties") or "additionalProperties" in schema):
        return None  # a tool without input shape is not validated by the SDK
    if arguments is None:
        issues = [_invalid_type("object", "undefined", [])]
    elif not isinstance(arguments, dict):
        issues = [_invalid_type("object", _received(arguments), [])]
    else:
        known = strip_and_default(schema, arguments)
        errors = list(validator(schema).iter_errors(known))
        issues = _issues(schema, errors)
        if errors and not issues:  # never let refused arguments reach a handler unreported
            issues = [{"code": "custom", "message": e.message, "path": list(e.absolute_path)} for e in errors]
    if not issues:
        return None
    body = json.dumps(issues, indent=2, ensure_ascii=False)
    return f"MCP error -32602: Input validation error: Invalid arguments for tool {tool}: {body}"


# --- jsonschema errors -> zod 3 issues ---------------------------------------------------------


def _issues(schema: dict[str, Any], errors: Iterable[ValidationError]) -> list[dict[str, Any]]:
    issues: list[dict[str, Any]] = []
    typed: set[tuple[Any, ...]] = set()  # paths with a type error: zod checks nothing else there
    required_done: set[tuple[Any, ...]] = set()
    for error in errors:
        issues += _convert(error, typed, required_done)
    # zod reports in the order of the object's keys; jsonschema lists missing keys after the present ones.
    order = {key: index for index, key in enumerate(schema.get("properties") or {})}
    kept = [i for i in issues if i.pop("_drop_if_typed", None) is None or tuple(i["path"]) not in typed]
    return sorted(kept, key=lambda i: order.get(i["path"][0], len(order)) if i["path"] else -1)


def _convert(error: ValidationError, typed: set[tuple[Any, ...]], required_done: set[tuple[Any, ...]]) -> list[Any]:
    path = list(error.absolute_path)
    keyword, value, sub = error.validator, error.validator_value, error.schema
    sub = sub if isinstance(sub, dict) else {}
    if keyword == "required":
        if tuple(path) in required_done:
            return []
        required_done.add(tuple(path))
        props = sub.get("properties") or {}
        instance = error.instance if isinstance(error.instance, dict) else {}
        wanted = value if isinstance(value, list) else []
        return [_type_issue(props.get(k) or {}, "undefined", [*path, k]) for k in wanted if k not in instance]
    if keyword == "type":
        float_for_int = sub.get("type") == "integer" and isinstance(error.instance, float)
        if not float_for_int:  # zod's int() is one check among others, the rest still run
            typed.add(tuple(path))
        return [_type_issue(sub, _received(error.instance), path)]
    if keyword == "anyOf":
        return _any_of(error, sub, path, typed, required_done)
    issue = _check_issue(str(keyword), value, error.instance, path)
    issue["_drop_if_typed"] = True
    return [issue]


def _any_of(
    error: ValidationError,
    sub: dict[str, Any],
    path: list[Any],
    typed: set[tuple[Any, ...]],
    required_done: set[tuple[Any, ...]],
) -> list[Any]:
    branches = sub.get("anyOf") or []
    inner = [i for i, b in enumerate(branches) if not (isinstance(b, dict) and b.get("type") == "null")]
    if len(branches) == 2 and len(inner) == 1:
        # `.nullable()`: zod parses the inner type unless the value is null, so its issues are the inner ones.
        out: list[Any] = []
        for child in error.context or []:
            if child.relative_schema_path and child.relative_schema_path[0] == inner[0]:
                out += _convert(child, typed, required_done)
        return out
    return [{"code": "invalid_union", "unionErrors": [], "path": path, "message": "Invalid input"}]


def _zod_type(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "unknown")
    return {"integer": "number"}.get(str(kind), str(kind))


def _received(value: Any) -> str:
    """zod's getParsedType for a JSON value (integers and floats are both `number`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _invalid_type(expected: str, received: str, path: list[Any]) -> dict[str, Any]:
    message = "Required" if received == "undefined" else f"Expected {expected}, received {received}"
    return {"code": "invalid_type", "expected": expected, "received": received, "path": path, "message": message}


def _join(options: list[Any]) -> str:
    return " | ".join(f"'{o}'" if isinstance(o, str) else json.dumps(o) for o in options)


def _type_issue(schema: dict[str, Any], received: str, path: list[Any]) -> dict[str, Any]:
    if schema.get("type") == "integer" and received == "number":
        # z.number().int() on a float: its own check, with the message before the path.
        return {
            "code": "invalid_type",
            "expected": "integer",
            "received": "float",
            "message": "Expected integer, received float",
            "path": path,
        }
    if "enum" in schema:  # z.enum: expected is the joined option list, and the key order differs
        expected = _join(list(schema["enum"]))
        message = "Required" if received == "undefined" else f"Expected {expected}, received {received}"
        return {"expected": expected, "received": received, "code": "invalid_type", "path": path, "message": message}
    if "anyOf" in schema:  # a required nullable: zod checks the inner type
        inner = next((b for b in schema["anyOf"] if isinstance(b, dict) and b.get("type") != "null"), {})
        return _type_issue(inner, received, path)
    return _invalid_type(_zod_type(schema), received, path)


def _num(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _check_issue(keyword: str, value: Any, instance: Any, path: list[Any]) -> dict[str, Any]:
    if keyword in ("minLength", "minItems", "minimum", "exclusiveMinimum"):
        kind = {"minLength": "string", "minItems": "array"}.get(keyword, "number")
        inclusive = keyword != "exclusiveMinimum"
        if kind == "string":
            message = f"String must contain at least {_num(value)} character(s)"
        elif kind == "array":
            message = f"Array must contain at least {_num(value)} element(s)"
        else:
            message = f"Number must be greater than {'or equal to ' if inclusive else ''}{_num(value)}"
        return {
            "code": "too_small",
            "minimum": value,
            "type": kind,
            "inclusive": inclusive,
            "exact": False,
            "message": message,
            "path": path,
        }
    if keyword in ("maxLength", "maxItems", "maximum", "exclusiveMaximum"):
        kind = {"maxLength": "string", "maxItems": "array"}.get(keyword, "number")
        inclusive = keyword != "exclusiveMaximum"
        if kind == "string":
            message = f"String must contain at most {_num(value)} character(s)"
        elif kind == "array":
            message = f"Array must contain at most {_num(value)} element(s)"
        else:
            message = f"Number must be less than {'or equal to ' if inclusive else ''}{_num(value)}"
        return {
            "code": "too_big",
            "maximum": value,
            "type": kind,
            "inclusive": inclusive,
            "exact": False,
            "message": message,
            "path": path,
        }
    if keyword == "pattern":
        return {"validation": "regex", "code": "invalid_string", "message": "Invalid", "path": path}
    if keyword == "format" and value == "uuid":
        return {"validation": "uuid", "code": "invalid_string", "message": "Invalid uuid", "path": path}
    if keyword == "format" and value == "date-time":
        return {"code": "invalid_string", "validation": "datetime", "message": "Invalid datetime", "path": path}
    if keyword == "enum":
        options = list(value)
        return {
            "received": instance,
            "code": "invalid_enum_value",
            "options": options,
            "path": path,
            "message": f"Invalid enum value. Expected {_join(options)}, received '{instance}'",
        }
    return {"code": "custom", "message": f"Invalid input ({keyword})", "path": path}
