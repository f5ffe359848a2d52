"""The vocabulary of ``nomad_vm.schema``: what a config field is, how decoded values are
checked against a schema (errors name the field), and how blocks flatten for the reference."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from nomad_vm.errors import ConfigError

FieldType = Literal["string", "number", "bool", "list(string)", "block"]


@dataclass(frozen=True)
class Field:
    """One attribute, e.g. ``kernel = "/path/vmlinux"``."""

    name: str
    type: FieldType
    doc: str
    default: object = None
    choices: tuple[str, ...] = ()
    example: str = ""
    minimum: int | None = None
    # For type "block": the attributes inside it, e.g. `os { machine = "q35" }`.
    fields: tuple[Field, ...] = ()
    # For type "block": the block may appear several times (`disk { } disk { }`); the value is
    # a list of objects.
    repeated: bool = False
    # For type "block": the block is named by a label (`directory "local" { }`), may appear
    # once per label, and its value maps each label to its object.
    labeled: bool = False

    def hcl_default(self) -> str | None:
        """The default as an HCL expression (hclspec Literal), or None without a default."""
        if self.default is None:
            return None
        return json.dumps(self.default)


@dataclass(frozen=True)
class Schema:
    """A flat set of fields: the body of a ``config {}`` block."""

    title: str
    where: str
    fields: tuple[Field, ...] = field(default_factory=tuple)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def validate(schema: Schema, raw: Mapping[str, object] | None, prefix: str) -> dict[str, object]:
    """Check types and choices of decoded config values and fill in defaults.

    ``raw`` is the decoded cty object (every key present, ``None`` when unset). Unknown keys are an
    error even though Nomad's HCL decoder already rejects them, because configs also come from
    tests and tools. ``prefix`` is prepended to field names in errors (``config`` for task config).
    """
    values = dict(raw or {})
    known = {f.name for f in schema.fields}
    for key in values:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}", f"unknown option; known options: {sorted(known)}")
    out: dict[str, object] = {}
    for f in schema.fields:
        value = values.get(f.name)
        if value is None:
            value = f.default
        out[f.name] = None if value is None else _check_value(f, value, f"{prefix}.{f.name}")
    return out


def _check_blocks(f: Field, value: object, path: str) -> object:
    if f.repeated:
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(path, f"must be {f.name} blocks, got {type(value).__name__}")
        return [_check_block(f, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if f.labeled:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, Mapping):
            raise ConfigError(path, f'must be labelled blocks ({f.name} "name" {{ ... }})')
        return {str(k): _check_block(f, v, f"{path}.{k}") for k, v in value.items()}
    return _check_block(f, value, path)


def _check_block(f: Field, value: object, path: str) -> dict[str, object]:
    # Nomad's jobspec turns a block into a list of objects; HCL hands us one object.
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a block ({f.name} {{ ... }}), got {type(value).__name__}")
    return validate(Schema(f.name, path, f.fields), value, path)


def _check_value(f: Field, value: object, path: str) -> object:
    if f.type == "block":
        return _check_blocks(f, value, path)
    if f.type == "string":
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {type(value).__name__}")
        if f.choices and value not in f.choices:
            raise ConfigError(path, f"must be one of {', '.join(f.choices)}; got {value!r}")
        return value
    if f.type == "bool":
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {value!r}")
        return value
    if f.type == "number":
        return _check_number(f, value, path)
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError(path, f"must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"{path}[{i}]", "must be a string")
    return list(value)


def _check_number(f: Field, value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ConfigError(path, f"must be a whole number, got {value!r}")
    if isinstance(value, Decimal):
        if value != value.to_integral_value():
            raise ConfigError(path, f"must be a whole number, got {value}")
        value = int(value)
    if f.minimum is not None and value < f.minimum:
        raise ConfigError(path, f"must be at least {f.minimum}, got {value}")
    return value


def flatten(fields: tuple[Field, ...], prefix: str = "") -> list[Field]:
    """Fields with blocks expanded to dotted names (``os.machine``) for the reference."""
    out: list[Field] = []
    for f in fields:
        if f.type == "block":
            # The block's own row carries its doc (what the block is for, what nomad-vm does
            # with it), then its attributes.
            form = " (one per name)" if f.labeled else " (repeatable)" if f.repeated else ""
            shown = f'{prefix}{f.name} "<name>"' if f.labeled else f"{prefix}{f.name}"
            out.append(Field(shown, "block", f.doc + form))
            label = ".<name>" if f.labeled else ""
            out += flatten(f.fields, f"{prefix}{f.name}{label}.")
        else:
            out.append(Field(f"{prefix}{f.name}", f.type, f.doc, f.default, f.choices, f.example))
    return out


def field_list(names: Sequence[str]) -> str:
    """Field names as a sentence names them: "a", "a and b", "a, b and c" (error texts)."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
