"""Between config and backend: a backend's option errors name the config field, and what a
backend's capabilities leave out is refused (fingerprint and task) without knowing the backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from nomad_vm import schema
from nomad_vm.driver.backend_options import FIELD_OF_OPTION, config_error
from nomad_vm.driver.config import parse_plugin_config
from nomad_vm.driver.fingerprint import fingerprint
from nomad_vm.driver.types import Health
from nomad_vm.errors import VMRequestError
from nomad_vm.vm.registry import HypervisorRegistry
from nomad_vm.vm.request import VMRequest
from tests.fakes.hypervisor import FakeHost, FakeHypervisor


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ("arch", "config.os.arch"),
        ("machine", "config.os.machine"),
        ("firmware", "config.firmware"),
        ("kernel", "config.kernel"),
        ("accelerator", "accelerator"),
        ("share_transport", "config.share_transport"),
        ("virtiofsd_binary", "config.virtiofsd_binary"),
    ],
)
def test_each_backend_option_names_its_config_field(option: str, field: str) -> None:
    error = config_error(VMRequestError(option, "no good"))
    assert (error.field, error.reason, str(error)) == (field, "no good", f"{field}: no good")


def test_every_request_attribute_a_backend_validates_has_a_field() -> None:
    validated = {"arch", "machine", "firmware"}
    assert validated <= set(VMRequest.__dataclass_fields__) & set(FIELD_OF_OPTION)


def test_fingerprint_refuses_a_setting_the_backend_cannot_do(tmp_path: Path) -> None:
    backend = FakeHypervisor(FakeHost())  # offers TCG only
    kvm = parse_plugin_config({"data_dir": str(tmp_path), "accelerator": "kvm"})
    found = fingerprint(kvm, backend)
    assert found.health == Health.UNHEALTHY
    assert found.description.startswith("accelerator: 'kvm' is not available with the fake")
    healthy = fingerprint(parse_plugin_config({"data_dir": str(tmp_path)}), backend)
    assert healthy.health == Health.HEALTHY
    assert healthy.attributes["driver.vm.accelerator"] == "tcg"


def test_registry_builds_each_backend_once_and_names_unknown_ones() -> None:
    made: list[int] = []

    def factory() -> FakeHypervisor:
        made.append(1)
        return FakeHypervisor(FakeHost())

    registry = HypervisorRegistry({"fake": factory}, default="fake")
    assert registry.default() is registry.get("fake") and made == [1]
    with pytest.raises(Exception, match="no hypervisor backend 'cloud-hypervisor'"):
        registry.get("cloud-hypervisor")
    with pytest.raises(ValueError):
        HypervisorRegistry({"fake": factory}, default="qemu")


def test_the_built_in_registry_has_qemu_as_default() -> None:
    registry = HypervisorRegistry()
    assert registry.names == ("cloud-hypervisor", "qemu") and registry.default_name == "qemu"
    assert registry.default().name == "qemu"
    assert registry.get("cloud-hypervisor").name == "cloud-hypervisor"
    # Every backend name is one the config allows, and the other way round.
    assert registry.names == tuple(sorted(schema.HYPERVISORS))
