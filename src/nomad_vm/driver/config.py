"""Plugin and task configuration as typed values, validated against ``nomad_vm.schema``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from pathlib import Path

from nomad_vm import schema
from nomad_vm.driver.ch_config import CloudHypervisorConfig, parse_cloud_hypervisor
from nomad_vm.driver.cloud_init_options import (
    gets_cloud_init_seed,
    read_user_data,
    refuse_cloud_init_options,
)
from nomad_vm.driver.guest_profile import GuestProfile, guest_profile
from nomad_vm.driver.hostname import default_hostname, validate_hostname
from nomad_vm.driver.ksm import KsmPolicy, parse_ksm
from nomad_vm.driver.memory_policy import DEFAULT_SETTINGS, PolicySettings, parse_policy_settings
from nomad_vm.driver.seed_files import seed_file_paths
from nomad_vm.driver.seed_keys import (
    SeedPluginKeys,
    parse_seed_plugin_keys,
    refuse_unsupported_task_keys,
)
from nomad_vm.driver.task_disks import task_disks
from nomad_vm.driver.types import TaskConfig
from nomad_vm.errors import ConfigError
from nomad_vm.fields import Schema, validate
from nomad_vm.identity import Identity, current
from nomad_vm.network.names import check_device_name
from nomad_vm.network.settings import (
    BridgeNetwork,
    MacvtapRequest,
    NicRequest,
    parse_bridge_network,
    parse_nic,
)
from nomad_vm.storage.cache_policy import CachePolicy, parse_cache_policy
from nomad_vm.storage.disk_request import DiskRequest
from nomad_vm.storage.image_url import UrlRules
from nomad_vm.storage.paths import Allowlist, private_dir, private_pattern, resolve_allowed_file

# A task's runtime directory is ``<task dir>/<RUNTIME_PREFIX>-<start id>`` (driver.runtime_dir).
RUNTIME_PREFIX = "nomad-vm"


@dataclass(frozen=True)
class PluginConfig:
    data_dir: Path
    image_paths: tuple[str, ...]
    accelerator: str
    qemu_binary: str
    share_transport: str = "auto"
    virtiofsd_binary: str = ""
    vm_user: str = "nomad-vm"
    seccomp: bool = True
    # The bridge and address pool, or None when the operator configured no subnet.
    network: BridgeNetwork | None = None
    # The hypervisor of tasks that name none; None: the registry's default (qemu).
    hypervisor: str | None = None
    cloud_hypervisor: CloudHypervisorConfig = field(default_factory=CloudHypervisorConfig)
    # The name this plugin is installed under (nomad_vm.identity): its driver name, attribute
    # prefix, nftables table and state directories.
    identity: Identity = field(default_factory=current)
    # The seed drivers' keys: plugin-level `dns`, ignored libvirt blocks, storage pools.
    seed: SeedPluginKeys = field(default_factory=SeedPluginKeys)

    @property
    def dns(self) -> tuple[IPv4Address, ...]:
        """Name servers for guests whose NIC sets none."""
        return self.seed.dns

    # The host interfaces macvtap NICs may stack on; empty: any.
    macvtap_devices: tuple[str, ...] = ()
    # Images given by URL: the node's cache (``storage.image_store``) and its policy.
    image_cache: CachePolicy = field(default_factory=CachePolicy)
    # Kernel Same-page Merging of guest RAM (driver/ksm.py).
    ksm: KsmPolicy = field(default_factory=KsmPolicy)
    # How hot-pluggable memory is resized (schema: `memory_hotplug`).
    memory_policy: PolicySettings = DEFAULT_SETTINGS
    # Each task's VMM and helpers in a cgroup of their own (nomad_vm.vm.cgroups).
    cgroups: bool = True
    # The firmware of tasks that choose none, and whether they may choose another.
    default_firmware: str = "bios"
    allow_task_firmware: bool = True

    @property
    def url_rules(self) -> UrlRules:
        return UrlRules(self.image_cache.allowed_schemes, self.image_cache.checksum_required)


@dataclass(frozen=True)
class VMTaskConfig:
    """A task's `config {}` after validation; paths are resolved and allowed."""

    image: Path | None
    use_thin_copy: bool
    disk_size_mb: int | None
    kernel: Path | None
    initramfs: Path | None
    cmdline: str
    firmware: str
    arch: str
    # "" when unset: the hypervisor's own default (the first of its machine types).
    machine: str
    hostname: str
    # The task's `hypervisor`; None: the plugin's.
    hypervisor: str | None = None
    cloud_init: bool = True
    # Plaintext only in memory until the seed hashes it; kept out of repr so it cannot be logged.
    password: str | None = field(default=None, repr=False)
    ssh_key: str | None = None
    cmds: tuple[str, ...] = ()
    timezone: str | None = None
    # The user's cloud-init document, already read from its file when it was given as a path.
    user_data: str | None = field(default=None, repr=False)
    share_task_dirs: bool = True
    writable_alloc_dir: bool = False
    nic: NicRequest | MacvtapRequest | None = None
    signal_unit: str | None = None
    signal_pidfile: str | None = None
    # Every disk, the primary first (``storage.disk_request``): the `disk` blocks, or the
    # shorthand's one disk from `image`; `image` and the two fields above are the primary's.
    disks: tuple[DiskRequest, ...] = ()
    # A graphical console's adapter, or "none" (schema: `display`).
    display: str = "none"
    # virtio-balloon free page reporting (schema: `free_page_reporting`).
    free_page_reporting: bool = False
    # Save the VM's state when the task stops, resume it at the next start (``snapshots``).
    snapshot_on_stop: bool = False
    # Guest RAM on the host's huge pages (schema: `hugepages`).
    hugepages: bool = False
    # The guest's platform and devices (`os.variant` and the options it stands for).
    profile: GuestProfile = field(default_factory=GuestProfile)
    # Files for the seed ISO's root (autounattend.xml, cloudbase-init), resolved and allowed.
    seed_files: tuple[Path, ...] = ()

    @property
    def gets_seed(self) -> bool:
        """Does this VM get a cloud-init seed (the only way the cloud-init options reach it)?"""
        return gets_cloud_init_seed(bool(self.disks), self.cloud_init)

    @property
    def gets_seed_iso(self) -> bool:
        """A seed ISO is attached: for cloud-init, or for the task's `seed_files`."""
        return self.gets_seed or bool(self.seed_files)


def parse_plugin_config(
    raw: Mapping[str, object] | None, identity: Identity | None = None
) -> PluginConfig:
    """``identity``: the name the plugin is installed under (its defaults); None: this
    process's (nomad_vm.identity.current)."""
    identity = identity or current()
    values = validate(schema.plugin_config_schema(identity), raw, "config")
    data_dir = str(values["data_dir"])
    if not Path(data_dir).is_absolute():
        raise ConfigError("config.data_dir", f"must be an absolute path, got {data_dir!r}")
    paths = values["image_paths"]
    assert isinstance(paths, list)
    for i, p in enumerate(paths):
        if not Path(p).is_absolute():
            raise ConfigError(f"config.image_paths[{i}]", f"must be an absolute path, got {p!r}")
        _refuse_overlap(f"config.image_paths[{i}]", Path(p), Path(data_dir))
    return PluginConfig(
        data_dir=Path(data_dir),
        image_paths=tuple(paths),
        accelerator=str(values["accelerator"]),
        qemu_binary=str(values["qemu_binary"]),
        share_transport=str(values["share_transport"]),
        virtiofsd_binary=str(values["virtiofsd_binary"] or ""),
        vm_user=str(values["vm_user"]),
        seccomp=bool(values["seccomp"]),
        network=parse_bridge_network(_network_block(values, identity), Path(data_dir)),
        hypervisor=_optional_str(values["hypervisor"]),
        cloud_hypervisor=parse_cloud_hypervisor(values["cloud_hypervisor"]),
        identity=identity,
        seed=parse_seed_plugin_keys(values),
        macvtap_devices=_interface_names(values["macvtap_devices"], "config.macvtap_devices"),
        image_cache=parse_cache_policy(_block(values["image_cache"])),
        ksm=parse_ksm(_block(values["ksm"])),
        memory_policy=parse_policy_settings(_block(values["memory_hotplug"])),
        cgroups=bool(values["cgroups"]),
        default_firmware=str(values["default_firmware"]),
        allow_task_firmware=bool(values["allow_task_firmware"]),
    )


def _interface_names(raw: object, field_name: str) -> tuple[str, ...]:
    names = tuple(str(n) for n in raw) if isinstance(raw, list) else ()
    for i, name in enumerate(names):
        check_device_name(name, f"{field_name}[{i}]")
    return names


def _refuse_overlap(field: str, image_dir: Path, data_dir: Path) -> None:
    """An image directory must not contain the plugin's data_dir, nor lie inside it: jobs may
    name any file in an image directory, and data_dir holds other tasks' disks, seeds and
    leases. Compared resolved (symlinks, ``..``), as the task paths are."""
    images, data = image_dir.resolve(), data_dir.resolve()
    if images == data:
        why = "is the plugin's data_dir"
    elif data in images.parents:
        why = f"is inside the plugin's data_dir {data}"
    elif images in data.parents:
        why = f"contains the plugin's data_dir {data}"
    else:
        return
    shown = str(image_dir) if image_dir == images else f"{image_dir} (resolved: {images})"
    raise ConfigError(
        field,
        f"{shown} {why}, where the plugin keeps its own state (other tasks' disks and "
        "cloud-init seeds, address leases); jobs may name any file in image_paths, so use a "
        "directory that holds only images, or move data_dir out of it",
    )


def task_allowlist(task: TaskConfig, plugin: PluginConfig) -> Allowlist:
    """Where a task's kernel, initramfs, image (and its backing files) and user_data may come
    from: the plugin's image_paths and the task's own allocation directory; never the
    plugin's own state (its data_dir, and the runtime dirs of any task in the allocation,
    which hold disks and seeds), even where an allowed directory contains it."""
    private = [private_dir(plugin.data_dir)]
    if task.alloc_dir:
        private.append(private_pattern(task.alloc_dir, "*", f"{RUNTIME_PREFIX}-*"))
    return Allowlist(roots=(*plugin.image_paths, task.alloc_dir), private=tuple(private))


def _block(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _network_block(values: Mapping[str, object], identity: Identity) -> dict[str, object]:
    """The `network {}` block; without one, the name's default network if it has one
    (nomad-driver-virt's: libvirt's virbr0, which its client configs never describe)."""
    if values["network"] is None and identity.network_defaults:
        return identity.network_block_defaults
    return _block(values["network"])


def parse_task_config(task: TaskConfig, plugin: PluginConfig) -> VMTaskConfig:
    """Validate a task's config; errors name the option as ``config.<name>``."""
    values = validate(schema.TASK_CONFIG, task.driver_config, "config")
    allowed = task_allowlist(task, plugin)

    def path_of(name: str) -> Path | None:
        value = values[name]
        if not value:
            return None
        return resolve_allowed_file(f"config.{name}", str(value), allowed, task.task_dir)

    if not values["kernel"] and not values["image"] and not values["disk"]:
        raise ConfigError(
            "config.image",
            'a VM needs something to boot: set image = "/path/disk.qcow2" (disk boot), '
            'kernel = "/path/vmlinux" (direct kernel boot), or both',
        )
    refuse_unsupported_task_keys(values)
    if values["initramfs"] and not values["kernel"]:
        raise ConfigError("config.initramfs", "needs kernel: an initramfs is loaded with a kernel")
    has_disk = bool(values["image"]) or bool(values["disk"])
    if not gets_cloud_init_seed(has_disk, bool(values["cloud_init"])):
        refuse_cloud_init_options(values)
    # An absent block decodes to None: its fields then take their defaults from the schema.
    os_block = values["os"] or validate(_block_schema("os"), {}, "config.os")
    assert isinstance(os_block, dict)
    profile = guest_profile(
        values,
        os_block,
        _block(values["network_interface"]),
        plugin.default_firmware,
        plugin.allow_task_firmware,
    )
    hostname = values["hostname"]
    machine = profile.machine or profile.default_machine or "pc"
    disks = task_disks(
        task, values, allowed, machine, plugin.seed, plugin.url_rules, profile.disk_bus
    )
    primary = disks[0] if disks else None
    return VMTaskConfig(
        disks=disks,
        image=primary.image if primary is not None else None,
        use_thin_copy=primary.chained if primary is not None else True,
        disk_size_mb=primary.size_mb if primary is not None else None,
        kernel=path_of("kernel"),
        initramfs=path_of("initramfs"),
        cmdline=str(values["cmdline"] or ""),
        firmware=profile.firmware,
        # Unset: the guest profile's (a Windows variant's VGA, else none); the schema keeps
        # unset apart from an explicit "none" for that.
        display=profile.display,
        free_page_reporting=bool(values["free_page_reporting"]),
        snapshot_on_stop=bool(values["snapshot_on_stop"]),
        hugepages=bool(values["hugepages"]),
        arch=str(os_block["arch"]),
        machine=profile.machine,
        profile=profile,
        seed_files=seed_file_paths(values["seed_files"], allowed, task.task_dir),
        hypervisor=_optional_str(values["hypervisor"]),
        hostname=(
            validate_hostname(str(hostname))
            if hostname
            else default_hostname(task.name, task.alloc_id)
        ),
        cloud_init=bool(values["cloud_init"]),
        password=_optional_str(values["default_user_password"]),
        ssh_key=_optional_str(values["default_user_authorized_ssh_key"]),
        cmds=tuple(values["cmds"] or ()),  # type: ignore[arg-type]
        timezone=_optional_str(values["timezone"]),
        user_data=read_user_data(values["user_data"], allowed, task.task_dir),
        share_task_dirs=bool(values["share_task_dirs"]),
        writable_alloc_dir=bool(values["writable_alloc_dir"]),
        signal_unit=_optional_str(values["signal_unit"]),
        signal_pidfile=_optional_str(values["signal_pidfile"]),
        nic=_with_default_dns(parse_nic(_block(values["network_interface"])), plugin.dns),
    )


def _with_default_dns(
    nic: NicRequest | MacvtapRequest | None, dns: tuple[IPv4Address, ...]
) -> NicRequest | MacvtapRequest | None:
    """The plugin's `dns` for a NIC that names no name servers: it then reaches the guest as
    every NIC setting does (cloud-init network-config, or the DHCP mode's dnsmasq)."""
    if nic is None or nic.dns or not dns:
        return nic
    return replace(nic, dns=dns)


def _block_schema(name: str) -> Schema:
    block = schema.TASK_CONFIG.field(name)
    return Schema(block.name, f"config.{name}", block.fields)


def _optional_str(value: object) -> str | None:
    return str(value) if value else None
