"""Pydantic models as OpenAPI v3 structural schemas, the form a CRD's validation takes.

Generic: property names in camelCase (``to_camel``), types, descriptions (every field needs one: ``kubectl
explain``), defaults, enums, bounds, and tagged unions (pydantic's discriminator ``kind``) as one object with CEL
rules per kind. What a model cannot say comes in as :class:`Rules`, by path; the BorgCollective's own rules live
in ``crd.py``.
"""

from __future__ import annotations

import copy
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from borg_operator.spec import camel_keys, to_camel
from borgdqn.config import yaml_switch

Schema = dict[str, Any]

# CEL reserves these words; a property so named would need escaping in every rule that reads it.
_CEL_RESERVED = {"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
                 "import", "let", "loop", "package", "namespace", "return", "var", "void", "while"}

_NO_DEFAULT = object()
Members = tuple[type[BaseModel], ...]


@dataclass(frozen=True)
class Rules:
    """What the models cannot say, by camelCase path under the root ("" is the root itself): a field's schema given
    whole (``overrides``), fields the apiserver refuses to change (``immutable``: path -> why) and CEL rules placed
    on an object (``object_rules``)."""

    overrides: Mapping[str, Schema] = field(default_factory=dict)
    immutable: Mapping[str, str] = field(default_factory=dict)
    object_rules: Mapping[str, list[Schema]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Walk:
    rules: Rules
    unions: tuple[Members, ...] = ()  # the tagged unions this walk is inside (they nest: policies of policies)

    def inside(self, members: Members) -> _Walk:
        return _Walk(self.rules, (*self.unions, members))


class CrdError(TypeError):
    """The models hold something the generator cannot express; the message names the field."""


# ---------------------------------------------------------------------------------------------------- walking
def wire_name(name: str, info: FieldInfo) -> str:
    """The field's name in the CRD: its alias (CrdModel) or its camelCase (the embedded borgdqn models)."""
    wire = info.alias or to_camel(name)
    if wire != to_camel(name):
        raise CrdError(f"{name}: alias {wire!r} is not its camelCase {to_camel(name)!r}")
    if wire in _CEL_RESERVED:
        raise CrdError(f"{name}: a CEL reserved word")
    return wire


def ordered(schema: Schema) -> Schema:
    # Reads better in the YAML (and in review): what it is, then what it holds, then the rules.
    first = ("description", "type", "format", "nullable", "enum", "default")
    return {**{k: schema[k] for k in first if k in schema}, **{k: v for k, v in schema.items() if k not in first}}


def _bounds(metadata: Sequence[Any], schema: Schema, where: str) -> None:
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            schema["minimum"] = item.ge
        elif isinstance(item, annotated_types.Gt):
            schema["minimum"], schema["exclusiveMinimum"] = item.gt, True
        elif isinstance(item, annotated_types.Le):
            schema["maximum"] = item.le
        elif isinstance(item, annotated_types.Lt):
            schema["maximum"], schema["exclusiveMaximum"] = item.lt, True
        elif isinstance(item, annotated_types.MinLen):
            schema["minItems" if schema["type"] == "array" else "minLength"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            schema["maxItems" if schema["type"] == "array" else "maxLength"] = item.max_length
        elif getattr(item, "pattern", None):
            schema["pattern"] = item.pattern
        elif isinstance(item, BeforeValidator) and item.func is yaml_switch:
            pass  # borgdqn's reading of YAML's on/off as the word; a CR gives the word itself
        else:
            raise CrdError(f"{where}: no CRD form for the constraint {item!r}")


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type_schema(annotation: Any, metadata: Sequence[Any], path: str, walk: _Walk) -> Schema:
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        inner, *extra = get_args(annotation)
        nested = [m for item in extra for m in (item.metadata if isinstance(item, FieldInfo) else [item])]
        return _type_schema(inner, [*nested, *metadata], path, walk)
    if origin in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) < len(get_args(annotation)):  # X | None
            if len(args) > 1:
                raise CrdError(f"{path}: no CRD form for a union with None of several types")
            return {**_type_schema(args[0], metadata, path, walk), "nullable": True}
        if all(_is_model(arg) for arg in args):
            return _union_schema(tuple(args), path, walk)
        raise CrdError(f"{path}: no CRD form for the union {annotation!r}")
    schema: Schema
    if origin is Literal:
        values = list(get_args(annotation))
        if not all(isinstance(v, str) for v in values):
            raise CrdError(f"{path}: only string literals become enums")
        schema = {"type": "string", "enum": values}
    elif annotation is bool:
        schema = {"type": "boolean"}
    elif annotation is int:
        schema = {"type": "integer", "format": "int64"}
    elif annotation is float:
        schema = {"type": "number"}
    elif annotation is str:
        schema = {"type": "string"}
    elif origin is list:
        (item,) = get_args(annotation)
        schema = {"type": "array", "items": _type_schema(item, [], f"{path}[]", walk)}
    elif origin is tuple:
        # Structural schemas have no tuple form: a [step, value] pair is a list of exactly its length.
        numbers = get_args(annotation)
        if not all(arg in (int, float) for arg in numbers):
            raise CrdError(f"{path}: only tuples of numbers become lists")
        schema = {"type": "array", "items": {"type": "number"}, "minItems": len(numbers), "maxItems": len(numbers)}
    elif origin is dict:
        key, value = get_args(annotation)
        if key is not str:
            raise CrdError(f"{path}: only string keys")
        schema = {"type": "object", "additionalProperties": _type_schema(value, [], f"{path}{{}}", walk)}
    elif _is_model(annotation):
        schema = _model_schema(annotation, path, walk)
    else:
        raise CrdError(f"{path}: no CRD form for {annotation!r}")
    _bounds(metadata, schema, path)
    return schema


def _description(model: type[BaseModel], name: str, info: FieldInfo, path: str) -> str:
    text = info.description
    if not text:
        raise CrdError(f"{path}: no description (give {model.__name__}.{name}'s Field one)")
    return text


def dump(value: Any) -> Any:
    """A Python default as the CRD (and the apiserver) writes it: JSON types, camelCase keys, no nulls."""
    if isinstance(value, BaseModel):
        return camel_keys(value.model_dump(mode="json", exclude_none=True))
    return camel_keys(json.loads(json.dumps(value)))


def _default(info: FieldInfo) -> Any:
    if info.is_required():
        return _NO_DEFAULT
    value = info.get_default(call_default_factory=True)
    if value is None:  # absent and null mean the same to the models
        return _NO_DEFAULT
    if _is_model(info.annotation) and isinstance(value, BaseModel):
        # `{}` lets the apiserver fill the object from its properties' own defaults; the same thing when the
        # factory builds the model's plain defaults (else, e.g. memory.resources, the values are spelt out).
        assert isinstance(info.annotation, type)
        plain = info.annotation()
        return {} if dump(value) == dump(plain) else dump(value)
    return dump(value)


def _field_schema(model: type[BaseModel], name: str, info: FieldInfo, path: str, walk: _Walk,
                  with_default: bool = True) -> Schema:
    if path in walk.rules.overrides:
        schema = copy.deepcopy(walk.rules.overrides[path])
    else:
        schema = _type_schema(info.annotation, info.metadata, path, walk)
    description = _description(model, name, info, path)
    schema["description"] = f"{description}; {schema['description']}" if "description" in schema else description
    default = _default(info)
    if with_default and default is not _NO_DEFAULT:
        schema["default"] = default
    if path in walk.rules.immutable:
        schema.setdefault("x-kubernetes-validations", []).append(
            {"rule": "self == oldSelf", "message": f"is immutable: {walk.rules.immutable[path]}"})
    return ordered(schema)


def model_schema(model: type[BaseModel], rules: Rules, path: str = "") -> Schema:
    """``model`` as a structural schema: every field described, defaulted, bounded; ``rules`` placed by path."""
    return _model_schema(model, path, _Walk(rules))


def _model_schema(model: type[BaseModel], path: str, walk: _Walk) -> Schema:
    properties: Schema = {}
    required: list[str] = []
    for name, info in model.model_fields.items():
        key = wire_name(name, info)
        properties[key] = _field_schema(model, name, info, f"{path}.{key}" if path else key, walk)
        if info.is_required():
            required.append(key)
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if path in walk.rules.object_rules:
        schema["x-kubernetes-validations"] = copy.deepcopy(walk.rules.object_rules[path])
    return schema


# ------------------------------------------------------------------------------------------- tagged unions
def kind_of(member: type[BaseModel]) -> str:
    default = member.model_fields["kind"].default
    if not isinstance(default, str):
        raise CrdError(f"{member.__name__}: a union member needs a literal `kind` with a default")
    return default


def _kind_schema(members: Members, path: str) -> Schema:
    kinds = [kind_of(member) for member in members]
    lines = []
    for member, kind in zip(members, kinds, strict=True):
        text = member.model_fields["kind"].description
        if not text:
            raise CrdError(f"{path}: no description of kind {kind!r} (give {member.__name__}.kind's Field one)")
        lines.append(f"{kind} ({text})")
    return {"description": "one of: " + "; ".join(lines), "type": "string", "enum": kinds}


def _union_schema(members: Members, path: str, walk: _Walk) -> Schema:
    """A tagged union (pydantic's discriminator `kind`) as one object: the kind enum plus every member's fields.

    No member's defaults go into the schema: the apiserver would write them into objects of every kind, and the
    models forbid fields of another kind. CEL rules check, per kind, the fields it needs and the ones it does
    not take. A union met again inside itself (switch and mixture policies nest policies) cannot recurse in a
    CRD: it becomes an object whose kind is checked and whose other fields the operator checks.
    """
    if members in walk.unions:
        return {
            "description": "a nested policy with the same fields (its kind is checked here, the rest by the "
            "operator)",
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {"kind": _kind_schema(members, path)},
            "required": ["kind"],
        }
    walk = walk.inside(members)
    found: dict[str, list[tuple[str, Schema, str]]] = {}
    for member in members:
        kind = kind_of(member)
        for name, info in member.model_fields.items():
            if name == "kind":
                continue
            key = wire_name(name, info)
            schema = _field_schema(member, name, info, f"{path}.{key}", walk, with_default=False)
            default = _default(info)
            note = "" if default is _NO_DEFAULT else f" (default {json.dumps(default)})"
            found.setdefault(key, []).append((kind, schema, schema.pop("description") + note))
    properties: Schema = {"kind": _kind_schema(members, path)}
    for key, entries in found.items():
        shapes = [schema for _, schema, _ in entries]
        if any(shape != shapes[0] for shape in shapes):
            raise CrdError(f"{path}.{key}: the kinds {[kind for kind, _, _ in entries]} give it different schemas")
        texts = list(dict.fromkeys(text for _, _, text in entries))
        description = " / ".join(texts)
        if len(entries) < len(members):
            description = f"{', '.join(kind for kind, _, _ in entries)}: {description}"
        properties[key] = ordered({"description": description, **shapes[0]})
    rules = []
    for member in members:
        kind = kind_of(member)
        own = {wire_name(name, info): info for name, info in member.model_fields.items() if name != "kind"}
        needed = [key for key, info in own.items() if info.is_required()]
        foreign = [key for key in properties if key != "kind" and key not in own]
        if needed:
            rules.append({"rule": f"self.kind != '{kind}' || ({' && '.join(f'has(self.{k})' for k in needed)})",
                          "message": f"kind {kind} needs {', '.join(needed)}"})
        if foreign:
            rules.append({"rule": f"self.kind != '{kind}' || !({' || '.join(f'has(self.{k})' for k in foreign)})",
                          "message": f"kind {kind} takes only {', '.join(['kind', *own])}"})
    return {"description": "its kind says which of these fields it takes", "type": "object",
            "properties": properties, "required": ["kind"], "x-kubernetes-validations": rules}
