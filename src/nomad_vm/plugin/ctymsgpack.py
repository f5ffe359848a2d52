"""Decode the go-cty msgpack payloads Nomad sends as plugin and task configuration.

Nomad turns the user's HCL into a ``cty.Value`` whose type is the schema's implied type and sends
``msgpack.Marshal(val, val.Type())`` (go-cty ``cty/msgpack/marshal.go``) in
``SetConfig.msgpack_config`` and ``TaskConfig.msgpack_driver_config``. The wire form is:

* null -> nil; string -> str; bool -> bool; list/set/tuple -> array; map/object -> map
  (objects carry *every* attribute, unset ones as nil);
* number -> compact int when it is exactly an int64, float64 when it is a non-integral value
  exactly representable as float64, otherwise a str with the decimal text (``"0.1"``,
  ``"18446744073709551616"``); older go-cty releases may send integral floats, so a reader must
  accept int, float *or* str for every number;
* an unknown value -> ext type 0 (``d4 00 00``) or ext type 0x0c with a refinement map.

A str is only a number where the schema says so, so decoding is split in two:

* :func:`decode` (built on :func:`unpack`) returns plain data: ``dict``, ``list``, ``str``,
  ``bool``, ``None``, ``int`` and ``Decimal`` (msgpack floats become ``int``/``Decimal`` so no
  binary float ever reaches the driver);
* :func:`coerce_number` is applied by the schema layer to every attribute typed ``number``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

# msgpack ships no type information; "unused-ignore" keeps this valid once pyproject adds an
# override for it.
import msgpack  # type: ignore[import-untyped,unused-ignore]

from nomad_vm.errors import ConfigError

__all__ = ["CtyDecodeError", "coerce_number", "decode", "unpack"]

# go-cty cty/msgpack/unknown.go: a wholly unknown value, and one carrying refinements.
UNKNOWN_EXT: Final = 0
UNKNOWN_REFINED_EXT: Final = 0x0C

# Task configs nest a handful of levels; the bound keeps our recursive walks far from Python's
# recursion limit even though msgpack itself accepts 1024 levels.
MAX_DEPTH: Final = 100

# Integers with more digits than Python's default int/str conversion limit are refused: nobody
# configures such a number, and int(Decimal("1e999999999")) would take minutes and gigabytes.
MAX_INT_DIGITS: Final = 4300

# The decimal text go-cty writes (big.Float.Text('f', -1)) plus the exponent form accepted by
# big.ParseFloat; stricter than Decimal(), which would also take "NaN", "1_0" and " 1 ".
_NUMBER_RE: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class CtyDecodeError(ConfigError):
    """The payload is not a usable cty value: malformed msgpack, an unknown value, ±Inf, ..."""


@dataclass(frozen=True)
class _Ext:
    """A msgpack extension value, kept as a marker so the walk can report where it was."""

    code: int
    data: bytes


def _ext_hook(code: int, data: bytes) -> _Ext:
    # Raising here would lose the attribute path; _check_leaf raises with the path instead.
    return _Ext(code, data)


def unpack(data: bytes, field: str = "config") -> object:
    """Parse go-cty msgpack into raw Python data, validated but with numbers as msgpack sent them.

    Returns ``None`` for an empty payload (Nomad sends no bytes when there is no config).
    Floats are left as ``float``; :func:`decode` converts them. Raises :class:`CtyDecodeError`
    (with ``field`` as the path prefix) for malformed msgpack, trailing bytes, unknown values,
    infinities, binary or extension values, and nesting deeper than :data:`MAX_DEPTH`.
    """
    if not data:
        return None
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_ext_hook)
    except (ValueError, msgpack.UnpackException, RecursionError) as exc:
        reason = f"malformed msgpack payload ({len(data)} bytes): {_describe(exc)}"
        raise CtyDecodeError(field, reason) from exc
    return _walk(raw, field, 0, _check_leaf)


def decode(data: bytes, field: str = "config") -> object:
    """Decode a cty msgpack payload into plain data; ``b""`` (no config) gives ``None``.

    Objects and maps become ``dict[str, object]``, lists/sets/tuples ``list``, null ``None``.
    Numbers sent as msgpack int/float become ``int`` when integral, else an exact ``Decimal``.
    Numbers sent as decimal text stay ``str``: pass them through :func:`coerce_number` where the
    schema says ``number``. Errors are :class:`CtyDecodeError` naming the offending path.
    """
    return _walk(unpack(data, field), field, 0, _normalise_leaf)


def coerce_number(value: object, field: str) -> int | Decimal:
    """Return a cty number as ``int`` when integral, else as an exact ``Decimal``.

    Accepts ``int``, finite ``float``/``Decimal`` and numeric text such as ``"0.1"``, ``"42"`` or
    ``"18446744073709551616"``. Anything else (``bool``, ``None``, ``"abc"``, ``NaN``, ...) raises
    ``ConfigError(field, "expected a number, got ...")``.
    """
    if isinstance(value, bool):
        # bool is an int subclass in Python, but cty never sends a bool for a number.
        raise ConfigError(field, f"expected a number, got {_kind(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(field, f"expected a finite number, got {value!r}")
        return _from_decimal(Decimal(value), field)  # Decimal(float) is exact
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ConfigError(field, f"expected a finite number, got {value}")
        return _from_decimal(value, field)
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value):
        return _from_decimal(Decimal(value), field)
    raise ConfigError(field, f"expected a number, got {_kind(value)}")


def _from_decimal(value: Decimal, field: str) -> int | Decimal:
    """Collapse an integral Decimal to int, refusing integers too large to build cheaply."""
    _, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):  # NaN/Inf: callers filter them, this keeps mypy honest
        raise ConfigError(field, f"expected a finite number, got {value}")
    # The number is integral when every digit right of the decimal point is zero.
    integral = exponent >= 0 or not any(digits[exponent:])
    if not integral:
        return value
    if value.adjusted() >= MAX_INT_DIGITS:
        raise ConfigError(field, f"number too large (more than {MAX_INT_DIGITS} digits)")
    return int(value)


Leaf = Callable[[object, str], object]


def _walk(value: object, path: str, depth: int, leaf: Leaf) -> object:
    """Rebuild ``value`` applying ``leaf`` to every scalar; ``path`` names it in errors."""
    if depth > MAX_DEPTH:
        raise CtyDecodeError(path, f"value nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CtyDecodeError(path, f"map key must be a string, got {_kind(key)}")
            out[key] = _walk(item, f"{path}.{key}", depth + 1, leaf)
        return out
    if isinstance(value, list):
        return [_walk(item, f"{path}[{i}]", depth + 1, leaf) for i, item in enumerate(value)]
    return leaf(value, path)


def _check_leaf(value: object, path: str) -> object:
    """Reject scalars a known cty value of a Nomad schema type can never be."""
    if isinstance(value, _Ext):
        if value.code in (UNKNOWN_EXT, UNKNOWN_REFINED_EXT):
            raise CtyDecodeError(
                path,
                "unknown value (go-cty unknown marker, msgpack ext type "
                f"{value.code:#04x}); the configuration references something not yet known",
            )
        raise CtyDecodeError(path, f"unsupported msgpack extension type {value.code}")
    if isinstance(value, msgpack.Timestamp):
        # msgpack decodes ext type -1 itself, without calling the ext hook.
        raise CtyDecodeError(path, "unsupported msgpack extension type -1 (timestamp)")
    if isinstance(value, float) and not math.isfinite(value):
        raise CtyDecodeError(path, f"number must be finite, got {value!r}")
    if isinstance(value, bytes):
        # go-cty only writes bin inside the dynamic-type wrapper, which Nomad never uses.
        raise CtyDecodeError(path, "unexpected binary value (dynamically typed cty value?)")
    return value


def _normalise_leaf(value: object, path: str) -> object:
    if isinstance(value, float):
        return coerce_number(value, path)
    return value


def _describe(exc: BaseException) -> str:
    """Turn msgpack's terse (sometimes empty) exception text into a readable reason."""
    if isinstance(exc, msgpack.ExtraData):
        return f"{len(exc.extra)} unexpected bytes after the value"
    if isinstance(exc, msgpack.OutOfData) or "incomplete input" in str(exc):
        return "truncated input"
    if "exceeds max_" in str(exc):
        # unpackb caps container and string lengths at the buffer size, so a length header
        # larger than the remaining payload means the payload was cut short.
        return "truncated input (a declared length exceeds the payload)"
    if isinstance(exc, msgpack.StackError | RecursionError):
        return "nested too deeply"
    if isinstance(exc, msgpack.FormatError):
        return "invalid msgpack type byte"
    if isinstance(exc, UnicodeDecodeError):
        return "string is not valid UTF-8"
    return str(exc) or type(exc).__name__


def _kind(value: object) -> str:
    """Describe a value for an error message without echoing a huge payload."""
    if value is None:
        return "null"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    return type(value).__name__
