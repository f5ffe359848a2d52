"""Between the config and a hypervisor backend: which config field each of the backend's options
comes from, and whether the backend can do what the config asks.

A backend speaks of ``machine`` or ``accelerator``; users wrote ``os { machine = ... }`` in a
task or ``accelerator`` in the plugin block. Errors must name what the user wrote, so the
hypervisor layer's VMRequestError becomes a ConfigError here. What a backend can do comes from
its declared capabilities, never from knowing which backend it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from nomad_vm.driver.config import PluginConfig, VMTaskConfig
from nomad_vm.errors import ConfigError, VMRequestError
from nomad_vm.vm.capabilities import HostSettings, HypervisorCapabilities
from nomad_vm.vm.request import VMPlan, VMRequest

# VMRequest attribute or host setting -> the config field it comes from (a setting that differs
# per backend is named by the HostSettings built for that backend: ``HostSettings.fields``).
FIELD_OF_OPTION = {
    "arch": "config.os.arch",
    "machine": "config.os.machine",
    "firmware": "config.firmware",
    "display": "config.display",
    "hugepages": "config.hugepages",
    "memory_max": "resources.memory_max",
    "kernel": "config.kernel",
    "accelerator": "accelerator",
    "share_transport": "config.share_transport",
    "virtiofsd_binary": "config.virtiofsd_binary",
    "vm_user": "config.vm_user",
    "tpm": "config.tpm",
    "hyperv": "config.hyperv",
    "rtc_localtime": "config.rtc",
    "nic_model": "config.network_interface.model",
    "seed_cdrom": "config.os.variant",
}
# Plugin settings whose "auto" lets the backend choose among what it supports.
AUTO = "auto"


def config_error(exc: VMRequestError, settings: HostSettings | None = None) -> ConfigError:
    field = settings.field_of(exc.option) if settings is not None else None
    return ConfigError(field or FIELD_OF_OPTION.get(exc.option, exc.option), exc.reason)


def host_settings(config: PluginConfig, backend: str = "qemu") -> HostSettings:
    """The plugin settings a backend runs with: its own block where it has one (the config's
    names are per hypervisor: `qemu_binary`, `cloud_hypervisor { bin }`), else the top level."""
    common = HostSettings(
        binary=config.qemu_binary,
        accelerator=config.accelerator,
        share_transport=config.share_transport,
        virtiofsd_binary=config.virtiofsd_binary,
        vm_user=config.vm_user,
        seccomp=config.seccomp,
        mem_merge=config.ksm.enabled,
        fields=(("binary", "qemu_binary"),),
    )
    block = BACKEND_BLOCKS.get(backend)
    return block(config, common) if block is not None else common


def _cloud_hypervisor(config: PluginConfig, common: HostSettings) -> HostSettings:
    ch = config.cloud_hypervisor
    block = "cloud_hypervisor"
    return replace(
        common,
        binary=ch.bin,
        virtiofsd_binary=ch.virtiofsd_bin or config.virtiofsd_binary,
        default_kernel=ch.default_kernel,
        default_initramfs=ch.default_initramfs,
        firmware_file=ch.firmware,
        seccomp_mode=ch.seccomp,
        log_file=ch.log_file,
        trust_kvm=ch.trust_kvm,
        fields=(
            ("binary", f"{block}.bin"),
            (
                "virtiofsd_binary",
                f"{block}.virtiofsd_bin" if ch.virtiofsd_bin else "virtiofsd_binary",
            ),
            ("default_kernel", f"{block}.default_kernel"),
            ("firmware_file", f"{block}.firmware"),
            ("log_file", f"{block}.log_file"),
            ("trust_kvm", f"{block}.trust_kvm"),
        ),
    )


# Backend name -> how its settings come from its own plugin config block.
BACKEND_BLOCKS: dict[str, Callable[[PluginConfig, HostSettings], HostSettings]] = {
    "cloud-hypervisor": _cloud_hypervisor,
}


def check_settings(backend: str, caps: HypervisorCapabilities, settings: HostSettings) -> None:
    """VMRequestError when a plugin setting asks for what the backend cannot do."""
    wanted = (
        ("accelerator", settings.accelerator, caps.accelerators),
        ("share_transport", settings.share_transport, caps.share_transports),
    )
    for option, value, supported in wanted:
        if value != AUTO and value not in supported:
            raise VMRequestError(option, _unsupported(backend, value, supported))


def check_request(backend: str, caps: HypervisorCapabilities, request: VMRequest) -> None:
    """ConfigError naming the task option when the request asks for what the backend cannot
    do; the backend's own plan then checks combinations (e.g. microvm with UEFI)."""
    wanted = (
        ("arch", request.arch, caps.arches),
        ("machine", request.machine, caps.machine_types),
        ("firmware", request.firmware, caps.firmware_kinds),
    )
    for option, value, supported in wanted:
        if value not in supported:
            raise ConfigError(FIELD_OF_OPTION[option], _unsupported(backend, value, supported))
    if request.display not in caps.displays:
        reason = (
            f"{request.display!r}: the {backend} hypervisor has no graphical console (no VNC "
            'server); leave display unset or "none"'
            if caps.displays == ("none",)
            else _unsupported(backend, request.display, caps.displays)
        )
        raise ConfigError(FIELD_OF_OPTION["display"], reason)
    if request.free_page_reporting and not caps.free_page_reporting:
        raise ConfigError(
            "config.free_page_reporting",
            f'not available with the {backend} hypervisor; remove it or use hypervisor = "qemu"',
        )
    if request.memory_max_mb is not None and not caps.memory_hotplug:
        raise ConfigError(
            "resources.memory_max",
            f"the {backend} hypervisor cannot add memory to a running VM (QEMU's virtio-mem "
            'does): remove memory_max or use hypervisor = "qemu"',
        )
    if request.hugepages and not caps.hugepages:
        raise ConfigError(
            "config.hugepages",
            f"not available with the {backend} hypervisor (QEMU only); remove it or use "
            'hypervisor = "qemu"',
        )
    for feature, asked, can in (
        ("tpm", request.tpm, caps.tpm),
        ("hyperv", request.hyperv, caps.hyperv),
        ("rtc_localtime", request.rtc_localtime, caps.rtc_localtime),
    ):
        if asked and not can:
            raise ConfigError(
                FIELD_OF_OPTION[feature],
                f"not available with the {backend} hypervisor (an os.variant may have asked "
                "for it: set the option to false, or use qemu)",
            )
    if request.nic_model not in caps.nic_models:
        raise ConfigError(
            FIELD_OF_OPTION["nic_model"], _unsupported(backend, request.nic_model, caps.nic_models)
        )
    if request.kernel is None and request.firmware not in caps.disk_boot_firmware:
        offered = ", ".join(caps.disk_boot_firmware) or "none"
        raise ConfigError(
            FIELD_OF_OPTION["firmware"],
            f"{request.firmware!r} cannot boot a disk with the {backend} hypervisor (firmware "
            f"that can: {offered}); set one of those, or give the VM a kernel",
        )


def _unsupported(backend: str, value: str, supported: tuple[str, ...]) -> str:
    offered = ", ".join(supported)
    return f"{value!r} is not available with the {backend} hypervisor (it offers {offered})"


def check_snapshot_option(
    vm: VMTaskConfig, backend: str, caps: HypervisorCapabilities, vm_plan: VMPlan
) -> None:
    """`snapshot_on_stop` needs a backend that saves snapshots, and no virtio-fs share: a
    vhost-user-fs device's state (its open files) lives in virtiofsd, which neither QEMU nor
    Cloud Hypervisor can save."""
    if not vm.snapshot_on_stop:
        return
    if not caps.snapshot:
        raise ConfigError(
            "config.snapshot_on_stop",
            f"the {backend} hypervisor cannot save a VM's state; use qemu, or set "
            "snapshot_on_stop = false",
        )
    if vm_plan.shares and vm_plan.share_transport.name == "virtiofs":
        way_out = "set share_task_dirs = false (and drop the task's volume_mounts)"
        if "9p" in caps.share_transports:
            way_out += ', or the plugin\'s share_transport = "9p"'
        raise ConfigError(
            "config.snapshot_on_stop",
            f"the VM's shared directories go over virtio-fs, whose state the {backend} "
            f"hypervisor cannot save; {way_out}",
        )
