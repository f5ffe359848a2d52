"""Between the config and a hypervisor backend: which config field each of the backend's options
comes from, and whether the backend can do what the config asks.

A backend speaks of ``machine`` or ``accelerator``; users wrote ``os { machine = ... }`` in a
task or ``accelerator`` in the plugin block. Errors must name what the user wrote, so the
hypervisor layer's VMRequestError becomes a ConfigError here. What a backend can do comes from
its declared capabilities, never from knowing which backend it is.
"""

from __future__ import annotations

from nomad_vm.driver.config import PluginConfig
from nomad_vm.errors import ConfigError, VMRequestError
from nomad_vm.vm.hypervisor import HostSettings, HypervisorCapabilities, VMRequest

# VMRequest attribute or host setting -> the config field it comes from.
FIELD_OF_OPTION = {
    "arch": "config.os.arch",
    "machine": "config.os.machine",
    "firmware": "config.firmware",
    "kernel": "config.kernel",
    "accelerator": "accelerator",
    "share_transport": "config.share_transport",
    "virtiofsd_binary": "config.virtiofsd_binary",
    "vm_user": "config.vm_user",
}
# Plugin settings whose "auto" lets the backend choose among what it supports.
AUTO = "auto"


def config_error(exc: VMRequestError) -> ConfigError:
    return ConfigError(FIELD_OF_OPTION.get(exc.option, exc.option), exc.reason)


def host_settings(config: PluginConfig) -> HostSettings:
    return HostSettings(
        binary=config.qemu_binary,
        accelerator=config.accelerator,
        share_transport=config.share_transport,
        virtiofsd_binary=config.virtiofsd_binary,
        vm_user=config.vm_user,
        seccomp=config.seccomp,
    )


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


def _unsupported(backend: str, value: str, supported: tuple[str, ...]) -> str:
    offered = ", ".join(supported)
    return f"{value!r} is not available with the {backend} hypervisor (it offers {offered})"
