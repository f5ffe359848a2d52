"""The plugin's `image_cache {}` block: defaults, values, and errors naming the field."""

from __future__ import annotations

import pytest

from nomad_vm.driver.config import parse_plugin_config
from nomad_vm.errors import ConfigError
from nomad_vm.storage.cache_policy import GIB, CachePolicy


def config(**cache: object) -> CachePolicy:
    return parse_plugin_config({"data_dir": "/var/lib/nomad-vm", "image_cache": cache}).image_cache


def test_defaults_without_the_block() -> None:
    policy = parse_plugin_config({"data_dir": "/var/lib/nomad-vm"}).image_cache
    assert policy == CachePolicy()
    assert policy.max_size == 50 * GIB and policy.max_unused_age == 168 * 3600
    assert policy.allowed_schemes == ("https", "http") and policy.checksum_required


def test_values() -> None:
    policy = config(
        max_size="10GiB",
        max_unused_age="1h30m",
        max_image_size="2GB",
        allowed_schemes=["HTTPS"],
        checksum_required=False,
        connect_timeout=3,
        read_timeout=7,
        gc_interval="30s",
    )
    assert policy.max_size == 10 * GIB
    assert policy.max_unused_age == 5400
    assert policy.max_image_size == -(-2 * 10**9 // 2**20) * 2**20
    assert policy.allowed_schemes == ("https",)
    assert not policy.checksum_required
    assert (policy.connect_timeout, policy.read_timeout, policy.gc_interval) == (3, 7, 30)
    assert CachePolicy.from_json(policy.to_json()) == policy


@pytest.mark.parametrize(
    ("block", "field"),
    [
        ({"allowed_schemes": ["https", "ftp"]}, r"config\.image_cache\.allowed_schemes\[1\]"),
        ({"max_size": "lots"}, r"config\.image_cache\.max_size"),
        ({"max_image_size": "0"}, r"config\.image_cache\.max_image_size"),
        ({"max_unused_age": "1 week"}, r"config\.image_cache\.max_unused_age"),
        ({"gc_interval": "often"}, r"config\.image_cache\.gc_interval"),
        ({"read_timeout": 0}, r"config\.image_cache\.read_timeout"),
        ({"checksum_required": "yes"}, r"config\.image_cache\.checksum_required"),
    ],
)
def test_bad_values_name_the_field(block: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: "):
        config(**block)
