"""Tests for nomad_vm.plugin.ctymsgpack against go-cty's msgpack wire format.

The ``GO_FIXTURES`` bytes were produced by go-cty v1.17.0 ``msgpack.Marshal(v, v.Type())`` (the
call Nomad makes); the test-only encoder below is checked against them, then used to generate
random payloads.
"""

from __future__ import annotations

import math
import struct
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nomad_vm.errors import ConfigError
from nomad_vm.plugin.ctymsgpack import CtyDecodeError, coerce_number, decode, unpack

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# --------------------------------------------------------------------------------------------
# Test-only encoder following go-cty cty/msgpack/marshal.go (doc §6.2).
# Python values stand for cty values: None=null, bool, str, int/Decimal=number, list, dict=object.


def _number_text(value: int | Decimal) -> str:
    """big.Float.Text('f', -1): plain decimal, no exponent, no trailing fractional zeros."""
    if isinstance(value, int):
        return str(value)
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _is_integral(value: int | Decimal) -> bool:
    return isinstance(value, int) or value == value.to_integral_value()


def _enc_int(n: int) -> bytes:
    # vmihailenco/msgpack EncodeInt with UseCompactInts: unsigned forms for n >= 0.
    if 0 <= n <= 0x7F:
        return bytes([n])
    if n >= 0:
        for code, fmt, limit in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 2**32 - 1)):
            if n <= limit:
                return bytes([code]) + struct.pack(fmt, n)
        return b"\xcf" + struct.pack(">Q", n)
    if n >= -32:
        return struct.pack(">b", n)
    for code, fmt, low in ((0xD0, ">b", -(2**7)), (0xD1, ">h", -(2**15)), (0xD2, ">i", -(2**31))):
        if n >= low:
            return bytes([code]) + struct.pack(fmt, n)
    return b"\xd3" + struct.pack(">q", n)


def _enc_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    n = len(raw)
    if n < 32:
        head = bytes([0xA0 | n])
    elif n <= 0xFF:
        head = bytes([0xD9, n])
    elif n <= 0xFFFF:
        head = b"\xda" + struct.pack(">H", n)
    else:
        head = b"\xdb" + struct.pack(">I", n)
    return head + raw


def _enc_number(value: int | Decimal) -> bytes:
    integral = _is_integral(value)
    if integral and INT64_MIN <= int(value) <= INT64_MAX:
        return _enc_int(int(value))
    as_float = float(value)
    if not integral and math.isfinite(as_float) and Decimal(as_float) == value:
        return b"\xcb" + struct.pack(">d", as_float)
    return _enc_str(_number_text(value))


def _enc_len(n: int, fix: int, code16: int) -> bytes:
    if n < 16:
        return bytes([fix | n])
    return bytes([code16]) + struct.pack(">H", n)


def cty_encode(value: object) -> bytes:
    if value is None:
        return b"\xc0"
    if isinstance(value, bool):
        return b"\xc3" if value else b"\xc2"
    if isinstance(value, int | Decimal):
        return _enc_number(value)
    if isinstance(value, str):
        return _enc_str(value)
    if isinstance(value, list):
        return _enc_len(len(value), 0x90, 0xDC) + b"".join(cty_encode(v) for v in value)
    if isinstance(value, dict):
        # go-cty sorts object attribute names with sort.Strings, i.e. by bytes.
        keys = sorted(value, key=lambda k: k.encode("utf-8"))
        body = b"".join(_enc_str(k) + cty_encode(value[k]) for k in keys)
        return _enc_len(len(keys), 0x80, 0xDE) + body
    raise TypeError(value)


# --------------------------------------------------------------------------------------------
# Golden bytes from go-cty v1.17.0.

WORKED_EXAMPLE_HEX = (
    "84a461726773c0a7636f6d6d616e64aa2f62696e2f736c656570a46f707473c0a5726174696fa3302e31"
)
WORKED_EXAMPLE = {"args": None, "command": "/bin/sleep", "opts": None, "ratio": Decimal("0.1")}

GO_NUMBERS = {
    "0": "00",
    "127": "7f",
    "128": "cc80",
    "255": "ccff",
    "256": "cd0100",
    "65536": "ce00010000",
    "4294967296": "cf0000000100000000",
    "9223372036854775807": "cf7fffffffffffffff",
    "9223372036854775808": "b339323233333732303336383534373735383038",
    "18446744073709551615": "b43138343436373434303733373039353531363135",
    "18446744073709551616": "b43138343436373434303733373039353531363136",
    "-1": "ff",
    "-32": "e0",
    "-33": "d0df",
    "-129": "d1ff7f",
    "-9223372036854775808": "d38000000000000000",
    "-9223372036854775809": "b42d39323233333732303336383534373735383039",
    "0.5": "cb3fe0000000000000",
    "2.25": "cb4002000000000000",
    "0.1": "a3302e31",
    "1.5e-7": "aa302e3030303030303135",
    "123456789.123456789": "b33132333435363738392e313233343536373839",
}

GO_OTHER = {
    "tuple": ("93a17801c3", ["x", 1, True]),
    "map": ("82a161a131a162a132", {"a": "1", "b": "2"}),
    "keys": (
        "85a142c3a3615f62c3a26162c3a162c3a2c3a9c3",
        dict.fromkeys(["b", "B", "é", "a_b", "ab"], True),
    ),
}


def _as_number(text: str) -> int | Decimal:
    d = Decimal(text)
    return int(d) if d == d.to_integral_value() else d


def test_worked_example_decodes() -> None:
    data = bytes.fromhex(WORKED_EXAMPLE_HEX)
    result = decode(data)
    assert result == {"args": None, "command": "/bin/sleep", "opts": None, "ratio": "0.1"}
    assert isinstance(result, dict)
    ratio = coerce_number(result["ratio"], "config.ratio")
    assert ratio == Decimal("0.1")
    assert isinstance(ratio, Decimal)


def test_encoder_matches_go_worked_example() -> None:
    assert cty_encode(WORKED_EXAMPLE).hex() == WORKED_EXAMPLE_HEX


@pytest.mark.parametrize(("text", "hex_bytes"), GO_NUMBERS.items())
def test_encoder_matches_go_numbers(text: str, hex_bytes: str) -> None:
    assert cty_encode(_as_number(text)).hex() == hex_bytes


@pytest.mark.parametrize(("text", "hex_bytes"), GO_NUMBERS.items())
def test_go_numbers_decode_exactly(text: str, hex_bytes: str) -> None:
    expected = _as_number(text)
    got = coerce_number(decode(bytes.fromhex(hex_bytes)), "config.n")
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize("name", GO_OTHER)
def test_go_containers(name: str) -> None:
    hex_bytes, value = GO_OTHER[name]
    assert cty_encode(value).hex() == hex_bytes
    assert decode(bytes.fromhex(hex_bytes)) == value


def test_go_1e300_is_a_long_string() -> None:
    # go-cty writes 1e300 (not exactly a float64) as 301 digits in a str16.
    data = b"\xda\x01\x2d1" + b"0" * 300
    assert coerce_number(decode(data), "n") == 10**300


# --------------------------------------------------------------------------------------------
# Round-trip properties.

EDGE_INTS = [
    0,
    127,
    128,
    255,
    256,
    65535,
    65536,
    2**32 - 1,
    2**32,
    INT64_MAX,
    2**63,
    2**64 - 1,
    2**64,
    -32,
    -33,
    -128,
    -129,
    -(2**31) - 1,
    INT64_MIN,
    INT64_MIN - 1,
]

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(EDGE_INTS),
    # Decimals built from text are exact: up to 21 significant digits, exponents -30..30.
    st.builds(
        lambda m, e: Decimal(f"{m}e{e}"), st.integers(-(10**20), 10**20), st.integers(-30, 30)
    ),
    st.floats(allow_nan=False, allow_infinity=False).map(Decimal),
)
scalars = st.one_of(st.none(), st.booleans(), st.text(max_size=20), numbers)
values = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=5),
        st.dictionaries(st.text(max_size=8), kids, max_size=5),
    ),
    max_leaves=30,
)


def _assert_matches(decoded: object, original: object, path: str) -> None:
    assert not isinstance(decoded, float), path
    if original is None or isinstance(original, bool | str):
        assert decoded == original and type(decoded) is type(original), path
    elif isinstance(original, int | Decimal):
        # Numbers sent as text stay str until the schema layer coerces them.
        number = coerce_number(decoded, path) if isinstance(decoded, str) else decoded
        assert number == original, path
        assert isinstance(number, int) == _is_integral(original), path
    elif isinstance(original, list):
        assert isinstance(decoded, list) and len(decoded) == len(original), path
        for i, (d, o) in enumerate(zip(decoded, original, strict=True)):
            _assert_matches(d, o, f"{path}[{i}]")
    else:
        assert isinstance(original, dict) and isinstance(decoded, dict), path
        assert decoded.keys() == original.keys(), path
        for key, item in original.items():
            _assert_matches(decoded[key], item, f"{path}.{key}")


@given(values)
def test_round_trip(value: object) -> None:
    _assert_matches(decode(cty_encode(value)), value, "config")


@given(st.dictionaries(st.text(max_size=8), values, min_size=1, max_size=4), st.data())
def test_every_truncation_is_a_clean_error(value: dict[str, object], data: st.DataObject) -> None:
    payload = cty_encode(value)
    cut = data.draw(st.integers(min_value=1, max_value=len(payload) - 1))
    with pytest.raises(CtyDecodeError, match="malformed msgpack"):
        decode(payload[:cut])


def test_all_truncations_of_worked_example() -> None:
    payload = bytes.fromhex(WORKED_EXAMPLE_HEX)
    for cut in range(1, len(payload)):
        with pytest.raises(CtyDecodeError, match="truncated"):
            decode(payload[:cut])


# --------------------------------------------------------------------------------------------
# coerce_number.


@given(st.integers())
def test_coerce_int_and_int_text(n: int) -> None:
    assert coerce_number(n, "f") == n
    got = coerce_number(str(n), "f")
    assert got == n and type(got) is int


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_coerce_float_is_exact(x: float) -> None:
    got = coerce_number(x, "f")
    assert got == Decimal(x)
    assert isinstance(got, int) == x.is_integer()


@given(st.decimals(allow_nan=False, allow_infinity=False, places=8))
def test_coerce_decimal_text(d: Decimal) -> None:
    got = coerce_number(format(d, "f"), "f")
    assert got == d
    assert isinstance(got, int) == (d == d.to_integral_value())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.1", Decimal("0.1")),
        ("42", 42),
        ("-7", -7),
        ("1.0", 1),
        ("-0", 0),
        ("1e3", 1000),
        ("2.5E-1", Decimal("0.25")),
        ("18446744073709551616", 2**64),
        (".5", Decimal("0.5")),
    ],
)
def test_coerce_text_examples(text: str, expected: int | Decimal) -> None:
    got = coerce_number(text, "f")
    assert got == expected and type(got) is type(expected)


def test_coerce_keeps_point_one_exact() -> None:
    assert coerce_number("0.1", "f") == Decimal("0.1")
    assert coerce_number("0.1", "f") != Decimal.from_float(0.1)


@pytest.mark.parametrize(
    "bad",
    [
        "abc",
        "",
        " 1",
        "1 ",
        "1_000",
        "NaN",
        "inf",
        "Infinity",
        "0x10",
        "1e",
        True,
        False,
        None,
        [],
        {},
        b"1",
        float("nan"),
        float("inf"),
        Decimal("NaN"),
        Decimal("-Infinity"),
    ],
)
def test_coerce_rejects(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        coerce_number(bad, "config.ratio")
    assert info.value.field == "config.ratio"
    assert str(info.value).startswith("config.ratio: expected a")


def test_coerce_none_names_field() -> None:
    with pytest.raises(ConfigError, match=r"^task\.cpus: expected a number, got null$"):
        coerce_number(None, "task.cpus")


def test_coerce_refuses_absurd_integers() -> None:
    with pytest.raises(ConfigError, match="too large"):
        coerce_number("1e999999999", "f")
    assert coerce_number("1e-999999999", "f") == Decimal("1e-999999999")


# --------------------------------------------------------------------------------------------
# Unknown values and other things Nomad must never send.


@pytest.mark.parametrize("hex_bytes", ["d40000", "c7030c8101c2"])
def test_unknown_value_top_level(hex_bytes: str) -> None:
    with pytest.raises(CtyDecodeError, match="unknown value") as info:
        unpack(bytes.fromhex(hex_bytes))
    assert info.value.field == "config"


def test_unknown_value_reports_path() -> None:
    # go-cty: ObjectVal({"a": UnknownVal(Number)})
    with pytest.raises(CtyDecodeError, match=r"^config\.a: unknown value"):
        decode(bytes.fromhex("81a161d40000"))
    nested = cty_encode({"disks": ["a", None]}).replace(b"\xc0", b"\xd4\x00\x00")
    with pytest.raises(CtyDecodeError, match=r"^task\.disks\[1\]: unknown value"):
        decode(nested, field="task")


@pytest.mark.parametrize(
    ("hex_bytes", "message"),
    [
        ("cb7ff0000000000000", "finite"),  # +Inf, as go-cty writes cty.PositiveInfinity
        ("cbfff0000000000000", "finite"),
        ("cb7ff8000000000000", "finite"),  # NaN
        ("d40500", "extension type 5"),
        ("d6ff00000001", "timestamp"),
        ("c40161", "binary"),
        ("81c401617b", "map key must be a string"),  # bin map key
        ("81017b", "malformed"),  # int map key
        ("a2fffe", "UTF-8"),
        ("c1", "invalid msgpack"),
    ],
)
def test_rejected_payloads(hex_bytes: str, message: str) -> None:
    with pytest.raises(CtyDecodeError, match=message):
        decode(bytes.fromhex(hex_bytes))


def test_infinity_rejected_by_unpack_too() -> None:
    with pytest.raises(CtyDecodeError, match=r"^config\.x: number must be finite"):
        unpack(bytes.fromhex("81a178cb7ff0000000000000"))


def test_extra_bytes() -> None:
    with pytest.raises(CtyDecodeError, match="2 unexpected bytes"):
        decode(bytes.fromhex(WORKED_EXAMPLE_HEX) + b"\xc0\xc0")


def test_deep_nesting() -> None:
    with pytest.raises(CtyDecodeError, match="nested"):
        decode(b"\x91" * 200 + b"\xc0")
    with pytest.raises(CtyDecodeError, match="nested too deeply"):
        decode(b"\x91" * 5000 + b"\xc0")


def test_empty_payload_means_no_config() -> None:
    assert decode(b"") is None
    assert unpack(b"") is None


def test_unpack_keeps_floats_decode_converts() -> None:
    data = cty_encode({"x": Decimal("0.5"), "y": [Decimal("2.25")]})
    assert unpack(data) == {"x": 0.5, "y": [2.25]}
    assert isinstance(unpack(data), dict)
    decoded = decode(data)
    assert decoded == {"x": Decimal("0.5"), "y": [Decimal("2.25")]}
    assert isinstance(decoded, dict) and isinstance(decoded["x"], Decimal)


def test_uint64_and_integral_float_inputs() -> None:
    # Not what go-cty >= 1.14.4 writes, but older releases and other encoders may.
    assert decode(b"\xcf" + b"\xff" * 8) == 2**64 - 1
    got = decode(b"\xcb" + struct.pack(">d", 2.0**64))
    assert got == 2**64 and type(got) is int
    assert decode(b"\xca" + struct.pack(">f", 0.5)) == Decimal("0.5")


def test_error_is_config_error() -> None:
    assert issubclass(CtyDecodeError, ConfigError)
