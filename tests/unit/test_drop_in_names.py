"""Drop-in names (nomad_vm.identity) and the seed drivers' client-config and task keys.

The seeds' client-config blocks appear here as Nomad hands them to the plugin (decoded HCL: a
block is an object, a labelled block a map from its label); their HCL text, as the seeds write
it, goes through a real agent in tests/e2e/test_drop_in_names.py.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from nomad_vm import identity, schema
from nomad_vm.cli.install import InstallRequest, plan_files, wrapper_script
from nomad_vm.driver.config import parse_plugin_config, parse_task_config
from nomad_vm.driver.network_plan import NetworkAttachment, network_config, plan_network
from nomad_vm.driver.networking import record_of
from nomad_vm.errors import ConfigError
from nomad_vm.identity import ALIASES, ENV_VAR, OWN, UnknownName, detect
from nomad_vm.network.dhcp import DhcpHost, dnsmasq_argv
from nomad_vm.network.names import tap_name
from nomad_vm.plugin.hclspec import schema_spec
from tests.unit.tasks import unit_task

VIRT, CH = ALIASES["virt"], ALIASES["ch"]


# --- which name ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv0", "env", "expected"),
    [
        ("/opt/nomad/plugins/nomad-driver-vm", {}, "vm"),
        ("/srv/venv/bin/nomad-driver-vm", {ENV_VAR: "virt"}, "virt"),  # the wrapper's variable
        ("/srv/venv/bin/nomad-driver-vm", {ENV_VAR: "ch"}, "nomad-driver-ch"),
        ("/opt/nomad/plugins/nomad-driver-virt", {}, "virt"),  # a symlink or copy by that name
        ("/opt/nomad/plugins/nomad-driver-ch", {}, "nomad-driver-ch"),
        ("/opt/nomad/plugins/nomad-driver-virt", {ENV_VAR: "vm"}, "vm"),  # the variable wins
        # Seed 001's jobs: the same file, chosen by the variable only.
        ("/srv/venv/bin/nomad-driver-vm", {ENV_VAR: "virt-legacy"}, "nomad-driver-virt"),
        ("python3", {}, "vm"),
        ("", {}, "vm"),
    ],
)
def test_the_name_comes_from_the_wrapper_variable_or_the_executable(
    argv0: str, env: dict[str, str], expected: str
) -> None:
    assert detect(argv0, env).driver_name == expected


def test_an_unknown_name_in_the_variable_is_an_error_saying_which_exist() -> None:
    with pytest.raises(UnknownName, match=r"NOMAD_VM_DRIVER_AS='qemu'.*ch, virt, virt-legacy, vm"):
        detect("nomad-driver-vm", {ENV_VAR: "qemu"})


def test_each_name_keeps_its_state_addresses_and_rules_apart() -> None:
    names = list(ALIASES.values())
    # virt and virt-legacy are one file (`plugin "nomad-driver-virt"`): a node has one of them.
    files = [n.file_name for n in names if n.alias != "virt-legacy"]
    assert len(set(files)) == len(files)
    assert ALIASES["virt-legacy"].file_name == VIRT.file_name
    # libvirt's virbr0 is both virt names' default: a node has only one of them.
    assert ALIASES["virt-legacy"].bridge == VIRT.bridge == "virbr0"
    assert len({n.bridge for n in names if n.alias != "virt-legacy"}) == len(names) - 1
    for attribute in (
        "driver_name",
        "data_dir",
        "tap_prefix",
        "nft_table",
        "journal_dir",
        "network_dir",
        "attribute_prefix",
    ):
        values = [getattr(n, attribute) for n in names]
        assert len(set(values)) == len(values), (attribute, values)
    for n in names:
        tap_name(n.tap_prefix, "check")  # a prefix the plugin accepts
        assert len(n.bridge) <= 15  # an interface name
    # No TAP prefix is a prefix of another's: names of one cannot be taken for the other's.
    prefixes = [n.tap_prefix for n in names]
    assert not any(a != b and b.startswith(a) for a in prefixes for b in prefixes)
    assert OWN.attribute_prefix == "driver.vm."
    assert VIRT.attribute_prefix == "driver.virt."


def test_a_seed_name_gets_its_own_defaults_and_reports_them_to_nomad() -> None:
    config = parse_plugin_config({"network": {"subnet_cidr": "10.98.0.0/24"}}, VIRT)
    assert config.data_dir == Path("/var/lib/nomad-vm-virt")
    assert config.network is not None
    assert (config.network.bridge, config.network.tap_prefix) == ("virbr0", "nvirt")
    own = parse_plugin_config({"network": {"subnet_cidr": "10.98.0.0/24"}}, OWN)
    assert own.data_dir == Path("/var/lib/nomad-vm")
    assert own.network is not None and own.network.bridge == "nomadvm0"
    # The schema Nomad gets (ConfigSchema) fills in the name's defaults too.
    spec = schema_spec(schema.plugin_config_schema(VIRT))
    assert spec.object.attributes["data_dir"].default.default.literal.value == (
        '"/var/lib/nomad-vm-virt"'
    )


def test_plugin_info_answers_the_installed_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from nomad_vm.plugin.base_service import BasePluginService

    service = BasePluginService(driver=None)  # type: ignore[arg-type]
    for alias, expected in (("virt", "virt"), ("ch", "nomad-driver-ch"), ("vm", "vm")):
        monkeypatch.setattr(identity, "_current", ALIASES[alias])
        info = asyncio.run(service.PluginInfo(None, None))  # type: ignore[arg-type]
        assert info.name == expected


def test_install_as_writes_the_seed_name_wrapper_and_block(tmp_path: Path) -> None:
    driver = tmp_path / "venv" / "bin" / "nomad-driver-vm"
    request = InstallRequest(
        plugin_dir=tmp_path / "plugins",
        config_file=tmp_path / "nomad.d" / "nomad-driver-virt.hcl",
        data_dir=VIRT.data_dir,
        as_name="virt",
    )
    (tmp_path / "nomad.d").mkdir()
    files, block = plan_files(request, driver)
    assert files[0].path == tmp_path / "plugins" / "nomad-driver-virt"
    assert files[0].text == wrapper_script(driver, VIRT)
    assert f"{ENV_VAR}=virt exec " in files[0].text
    assert block.startswith('plugin "nomad-driver-virt" {')
    assert 'data_dir    = "/var/lib/nomad-vm-virt"' in block
    assert wrapper_script(driver) == f'#!/bin/sh\nexec {driver} "$@"\n'  # `vm` as before


# --- the seeds' client configs (decoded as Nomad hands them over) ------------------------


def seed_000_ch(root: Path) -> dict[str, object]:
    """Seed 000 (nomad-driver-ch), "Driver Configuration": the full block; paths under root."""
    return {
        "cloud_hypervisor": {
            "bin": str(root / "bin/cloud-hypervisor"),
            "remote_bin": str(root / "bin/ch-remote"),
            "virtiofsd_bin": str(root / "bin/virtiofsd"),
            "default_kernel": str(root / "boot/vmlinuz"),
            "default_initramfs": str(root / "boot/initramfs.img"),
            "firmware": str(root / "boot/OVMF.fd"),
            "seccomp": "true",
            "log_file": str(root / "cloud-hypervisor.log"),
        },
        "network": {
            "bridge": "br0",
            "subnet_cidr": "192.168.1.0/24",
            "gateway": "192.168.1.1",
            "ip_pool_start": "192.168.1.100",
            "ip_pool_end": "192.168.1.200",
            "tap_prefix": "tap",
        },
        "data_dir": str(root / "data"),
        "image_paths": [str(root / "images"), str(root / "images2"), str(root / "images3")],
    }


def seed_001_virt(root: Path) -> dict[str, object]:
    """Seed 001 (nomad-driver-virt, earlier README), "Driver Configuration"."""
    return {
        "emulator": {"uri": "qemu:///default"},
        "data_dir": str(root / "data"),
        "image_paths": [str(root / "images")],
    }


def seed_002_virt(root: Path) -> dict[str, object]:
    """Seed 002 (nomad-driver-virt, later README), "Examples": the full libvirt example."""
    return {
        "provider": {
            "libvirt": {"uri": "qemu:///system", "user": "libvirt-username", "password": "x"}
        },
        "image_paths": [str(root / "images"), str(root / "images2")],
        "storage_pools": {
            "default": "local",
            "directory": {"local": {"path": str(root / "storage")}},
            "ceph": {
                "remote-storage": {
                    "pool": "nomad-pool",
                    "hosts": ["10.0.0.2:3300", "10.0.0.12:3300", "10.0.0.99:3300"],
                    "authentication": {
                        "username": "nomad",
                        "secret": "AQCzNMxpb6aWIxAA7YrNMSg8z5TxEvB0jsuibQ==",
                    },
                }
            },
        },
    }


def test_seed_000_ch_block_is_accepted(tmp_path: Path) -> None:
    config = parse_plugin_config(seed_000_ch(tmp_path), CH)
    assert config.cloud_hypervisor.bin == str(tmp_path / "bin/cloud-hypervisor")
    assert config.network is not None and config.network.tap_prefix == "tap"
    assert config.seed.warnings() == []
    assert config.seed.attributes(CH.attribute_prefix) == {}


def test_seed_001_emulator_is_ignored_with_a_warning_and_an_attribute(tmp_path: Path) -> None:
    config = parse_plugin_config(seed_001_virt(tmp_path), VIRT)
    assert config.data_dir == tmp_path / "data"
    (warning,) = config.seed.warnings()
    assert "emulator" in warning and "runs QEMU directly" in warning
    attrs = config.seed.attributes(VIRT.attribute_prefix)
    assert "runs QEMU directly" in attrs["driver.virt.libvirt"]


def test_seed_002_provider_and_storage_pools_are_accepted_and_reported(tmp_path: Path) -> None:
    config = parse_plugin_config(seed_002_virt(tmp_path), VIRT)
    seed = config.seed
    assert seed.libvirt_blocks == ('provider "libvirt"',)
    assert seed.storage_pools == ("directory local", "ceph remote-storage")
    assert seed.default_pool == "local"
    attrs = seed.attributes("driver.virt.")
    assert attrs["driver.virt.storage_pools"] == (
        "directory local, ceph remote-storage (default local)"
    )
    assert seed.directory_pools == {"local": tmp_path / "storage"}
    remote = seed.ceph["remote-storage"]
    assert (remote.pool, remote.username, [str(m) for m in remote.monitors]) == (
        "nomad-pool",
        "nomad",
        ["10.0.0.2:3300", "10.0.0.12:3300", "10.0.0.99:3300"],
    )
    # The key is kept for the connections, never shown.
    assert remote.secret not in repr(seed) and not any("Ceph" in w for w in seed.warnings())


def test_seed_000_vfio_block_is_accepted_and_reported_as_not_supported_yet() -> None:
    # Seed 000, "Driver Configuration": the vfio block (commented out there, "not yet
    # implemented"), uncommented.
    raw = {"vfio": {"allowlist": ["10de:*", "8086:0d26"], "iommu_address_width": 48,
                    "pci_segments": 1}}  # fmt: skip
    seed = parse_plugin_config(raw, CH).seed
    assert seed.attributes("driver.nomad-driver-ch.") == {
        "driver.nomad-driver-ch.vfio": "not supported yet: configured, not used"
    }
    assert any("PCI passthrough is not supported yet" in w for w in seed.warnings())


def test_a_single_pool_is_the_default(tmp_path: Path) -> None:
    raw = {"storage_pools": {"directory": {"local": {"path": str(tmp_path)}}}}
    assert parse_plugin_config(raw, VIRT).seed.default_pool == "local"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"provider": {"xen": {}}}, "config.provider.xen"),
        ({"dns": ["8.8.8.8", "resolver"]}, "config.dns[1]"),
        ({"storage_pools": {"directory": {"a": {"path": "rel"}}}}, "config.storage_pools"),
        (
            {"storage_pools": {"default": "b", "directory": {"a": {"path": "/srv/a"}}}},
            "config.storage_pools.default",
        ),
        (
            {
                "storage_pools": {
                    "directory": {"a": {"path": "/srv/a"}, "b": {"path": "/srv/b"}},
                }
            },
            "config.storage_pools.default",
        ),
        ({"storage_pools": {"ceph": {"c": {"pool": "p"}}}}, "config.storage_pools.ceph.c.hosts"),
        (
            {"storage_pools": {"ceph": {"c": {"pool": "p", "hosts": ["mon1"]}}}},
            "config.storage_pools.ceph.c.hosts[0]",
        ),
        (
            {"storage_pools": {"ceph": {"c": {"pool": "p", "hosts": ["m:3300"]}}}},
            "config.storage_pools.ceph.c.authentication.username",
        ),
        (
            {
                "storage_pools": {
                    "ceph": {
                        "c": {
                            "pool": "p",
                            "hosts": ["m:3300"],
                            "authentication": {"username": "u", "secret": "not-a-key"},
                        }
                    }
                }
            },
            "config.storage_pools.ceph.c.authentication.secret",
        ),
    ],
)
def test_bad_seed_plugin_keys_name_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_plugin_config(raw, VIRT)
    assert err.value.field.startswith(field), err.value


# --- the seeds' task keys ------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "nginx.img").write_bytes(b"\0" * 512)
    (tmp_path / "alloc").mkdir()
    return tmp_path / "images"


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        # Seed 000, "API Reference": usb_devices (its os { variant = "ubuntu20.04" } is
        # accepted: tests/unit/test_windows_profile.py).
        ({"usb_devices": ["046d:c52b"]}, "config.usb_devices", "USB passthrough"),
        # Seed 000, "GPU passthrough" (commented out there, documented as coming).
        ({"vfio_devices": ["10de:2204"]}, "config.vfio_devices", "PCI (VFIO) passthrough"),
    ],
)
def test_seed_task_keys_nomad_vm_cannot_honour_are_refused_by_name(
    images: Path, extra: dict[str, object], field: str, says: str
) -> None:
    plugin = parse_plugin_config({"image_paths": [str(images)]}, VIRT)
    task = unit_task(images.parent / "alloc", {"image": str(images / "nginx.img"), **extra})
    with pytest.raises(ConfigError) as err:
        parse_task_config(task, plugin)
    assert err.value.field == field
    assert says in str(err.value) and "not supported yet" in str(err.value)


def test_empty_passthrough_lists_are_accepted(images: Path) -> None:
    plugin = parse_plugin_config({"image_paths": [str(images)]}, VIRT)
    task = unit_task(
        images.parent / "alloc",
        {"image": str(images / "nginx.img"), "usb_devices": [], "vfio_devices": [], "disk": []},
    )
    assert parse_task_config(task, plugin).image == images / "nginx.img"


# --- the plugin's dns ------------------------------------------------------------------------


def test_plugin_dns_reaches_the_network_config_and_dhcp_of_a_seed_job(tmp_path: Path) -> None:
    root = tmp_path
    (root / "images").mkdir()
    (root / "images" / "nginx.img").write_bytes(b"\0" * 512)
    (root / "alloc").mkdir()
    # Seed 000's client config, with a `dns` list added.
    plugin = parse_plugin_config({**seed_000_ch(root), "dns": ["192.0.2.53"]}, CH)
    # Seed 000, "VM Health Checks": a task on br0 with a static_ip and no dns of its own.
    task = unit_task(
        root / "alloc",
        {
            "image": str(root / "images" / "nginx.img"),
            "network_interface": {"bridge": {"name": "br0", "static_ip": "192.168.1.100"}},
        },
    )
    vm = parse_task_config(task, plugin)
    assert vm.nic is not None and vm.nic.dns == (IPv4Address("192.0.2.53"),)
    plan = plan_network(task.id, vm.nic, plugin.network, ())
    assert plan is not None
    # What NetworkManager makes of the plan once the address is leased.
    attachment = NetworkAttachment(
        record=record_of(plan),
        address=IPv4Address("192.168.1.100"),
        prefixlen=24,
        gateway=IPv4Address("192.168.1.1"),
        dns=vm.nic.dns,
        port_map={},
    )
    nic = next(iter(network_config(attachment)["ethernets"].values()))
    assert nic["nameservers"] == {"addresses": ["192.0.2.53"]}
    host = DhcpHost(plan.guest_mac, IPv4Address("192.168.1.100"), "h", plugin.network.gateway,
                    vm.nic.dns)  # fmt: skip
    argv = dnsmasq_argv(Path("dnsmasq"), root, "br0", plugin.network.subnet, {"t": host})
    assert any(a.endswith("option:dns-server,192.0.2.53") for a in argv), argv


def test_a_task_dns_wins_over_the_plugin_dns(images: Path) -> None:
    plugin = parse_plugin_config(
        {
            "image_paths": [str(images)],
            "dns": ["192.0.2.53"],
            "network": {"subnet_cidr": "10.98.0.0/24"},
        },
        VIRT,
    )
    task = unit_task(
        images.parent / "alloc",
        {
            "image": str(images / "nginx.img"),
            "network_interface": {"bridge": {"dns": ["198.51.100.1"]}},
        },
    )
    vm = parse_task_config(task, plugin)
    assert vm.nic is not None and vm.nic.dns == (IPv4Address("198.51.100.1"),)


def test_installed_as_virt_the_plugin_runs_libvirts_default_network_without_a_block() -> None:
    """nomad-driver-virt's client configs have no network block (libvirt made virbr0) and its
    jobs say `bridge { name = "virbr0" }`: unchanged, they get that network."""
    for alias in ("virt", "virt-legacy"):
        net = parse_plugin_config({}, ALIASES[alias]).network
        assert net is not None
        assert (net.bridge, str(net.subnet), str(net.gateway)) == (
            "virbr0",
            "192.168.122.0/24",
            "192.168.122.1",
        )
        assert net.create_bridge and not net.nat and net.dnsmasq is None
    # A block of the operator's own wins, key by key.
    net = parse_plugin_config({"network": {"subnet_cidr": "10.98.0.0/24"}}, VIRT).network
    assert net is not None and str(net.subnet) == "10.98.0.0/24" and net.bridge == "virbr0"
    # The other names have no network until the operator describes one.
    assert parse_plugin_config({}, OWN).network is None
    assert parse_plugin_config({}, ALIASES["ch"]).network is None
