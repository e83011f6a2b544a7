"""`response_format` as a GBNF grammar the engine's grammar sampler enforces, decided on the head.

The converter is llama-cpp-python's own (`llama_cpp/llama_grammar.py`, pure Python: llama.cpp's
json-schema-to-grammar). It is loaded from its file rather than imported as `llama_cpp.llama_grammar`, which
would first run `llama_cpp/__init__` and map libllama into the orchestrator, which only the engine process needs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from meshtui.api_openai import ApiError
from meshtui.errors import MeshError

# JSON forbids raw control characters in strings; the converter's `char` rule lets them through, and a reply with
# a raw newline in a string would not parse. The same rule with them left out (as its own JSON_GBNF does).
_LOOSE_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


@dataclass(frozen=True)
class ResponseFormat:
    """What a request's `response_format` asked: its type, and the grammar that enforces it (None for text)."""

    type: str  # "text" | "json_object" | "json_schema"
    grammar: str | None = None
    name: str | None = None  # json_schema's name


@functools.cache
def _converter() -> ModuleType:
    spec = importlib.util.find_spec("llama_cpp")
    locations = spec.submodule_search_locations if spec is not None else None
    path = Path(next(iter(locations or []), "")) / "llama_grammar.py"
    loader_spec = importlib.util.spec_from_file_location("meshtui_llama_grammar", path)
    if not path.is_file() or loader_spec is None or loader_spec.loader is None:
        raise MeshError(f"{path}: llama-cpp-python's grammar converter is missing (reinstall: ./scripts/setup)")
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def json_object_grammar() -> str:
    """Any JSON object (llama-cpp-python's JSON_GBNF)."""
    grammar: str = _converter().JSON_GBNF
    return grammar


def json_schema_grammar(schema: Any, param: str) -> str:
    """A grammar for JSON documents that validate against `schema`; what it cannot express is a 400 on `param`."""
    try:
        grammar: str = _converter().json_schema_to_gbnf(json.dumps(schema))
    # The converter reports a schema it cannot express with `assert` (AssertionError) or fails on its shape.
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        raise ApiError(400, f"'{param}' cannot be turned into a grammar: {err}", param=param) from err
    return grammar.replace(_LOOSE_CHAR, _JSON_CHAR)


def parse_response_format(value: Any) -> ResponseFormat:
    """`response_format`: text, json_object, or json_schema ({name, schema, strict, description})."""
    if value is None:
        return ResponseFormat("text")
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ApiError(400, "'response_format' must be an object with a 'type'", param="response_format")
    kind = value["type"]
    if kind == "text":
        return ResponseFormat("text")
    if kind == "json_object":
        return ResponseFormat("json_object", json_object_grammar())
    if kind != "json_schema":
        raise ApiError(400, f"'response_format.type' {kind!r} is not supported (text, json_object, json_schema)",
                       param="response_format.type")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ApiError(400, "'response_format.json_schema' must be an object with a 'name'",
                       param="response_format.json_schema")
    unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if unknown:
        raise ApiError(400, f"'response_format.json_schema.{unknown[0]}' is not supported",
                       param=f"response_format.json_schema.{unknown[0]}")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema object",
                       param="response_format.json_schema.schema")
    return ResponseFormat("json_schema", json_schema_grammar(schema, "response_format.json_schema.schema"),
                          spec["name"])
