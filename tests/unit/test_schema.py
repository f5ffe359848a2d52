"""The schema: validation messages, hclspec derived from it, and the generated reference."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from nomad_vm import fields, schema
from nomad_vm.cli.reference import render_reference
from nomad_vm.errors import ConfigError
from nomad_vm.plugin.hclspec import schema_spec
from nomad_vm.plugin.proto import hclspec_pb2

REPO = Path(__file__).resolve().parents[2]


def test_defaults_fill_unset_values() -> None:
    values = fields.validate(schema.PLUGIN_CONFIG, {"accelerator": None}, "config")
    assert values["accelerator"] == "auto"
    assert values["image_paths"] == []
    assert values["data_dir"] == "/var/lib/nomad-vm"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError) as err:
        fields.validate(schema.TASK_CONFIG, {"kernal": "/x"}, "config")
    assert err.value.field == "config.kernal"
    assert "unknown option" in str(err.value)


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ({"accelerator": "fast"}, "config.accelerator", "must be one of auto, kvm, tcg"),
        ({"accelerator": 3}, "config.accelerator", "must be a string"),
        ({"image_paths": "/srv"}, "config.image_paths", "must be a list of strings"),
        ({"image_paths": ["/srv", 4]}, "config.image_paths[1]", "must be a string"),
    ],
)
def test_type_errors_name_the_field(raw: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        fields.validate(schema.PLUGIN_CONFIG, raw, "config")
    assert err.value.field == field
    assert reason in err.value.reason


def test_numbers_accept_decimal_wholes_and_reject_fractions() -> None:
    f = fields.Field("n", "number", "doc", minimum=1)
    assert fields._check_number(f, Decimal("4"), "x") == 4
    with pytest.raises(ConfigError, match="whole number"):
        fields._check_number(f, Decimal("0.5"), "x")
    with pytest.raises(ConfigError, match="at least 1"):
        fields._check_number(f, 0, "x")
    with pytest.raises(ConfigError, match="whole number"):
        fields._check_number(f, True, "x")


def test_hclspec_has_every_field_with_types_and_defaults() -> None:
    spec = schema_spec(schema.PLUGIN_CONFIG)
    assert spec.WhichOneof("block") == "object"
    attrs = spec.object.attributes
    assert set(attrs) == {f.name for f in schema.PLUGIN_CONFIG.fields}
    accel = attrs["accelerator"]
    assert accel.WhichOneof("block") == "default"
    assert accel.default.primary.Attr.type == "string"
    assert accel.default.default.literal.value == '"auto"'
    assert attrs["image_paths"].default.primary.Attr.type == "list(string)"
    assert attrs["image_paths"].default.default.literal.value == "[]"


def test_task_spec_kernel_is_a_plain_optional_attr() -> None:
    kernel = schema_spec(schema.TASK_CONFIG).object.attributes["kernel"]
    assert kernel == hclspec_pb2.Spec(Attr=hclspec_pb2.Attr(name="kernel", type="string"))


def test_configuration_reference_is_current() -> None:
    checked_in = (REPO / "docs" / "configuration.md").read_text()
    assert checked_in == render_reference(), "docs/configuration.md is stale: make docs"
