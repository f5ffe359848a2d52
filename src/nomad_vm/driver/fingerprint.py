"""What the node reports about this driver: health and `driver.vm.*` attributes."""

from __future__ import annotations

import asyncio

from nomad_vm import __version__
from nomad_vm.driver.config import PluginConfig
from nomad_vm.driver.types import AttributeValue, Fingerprint, Health
from nomad_vm.errors import ConfigError, HypervisorError, NetworkError
from nomad_vm.network import links
from nomad_vm.network.settings import BridgeNetwork
from nomad_vm.vm.accel import choose_accelerator, probe_kvm
from nomad_vm.vm.qemu.binary import find_qemu, qemu_version
from nomad_vm.vm.share_transport import choose_share_transport


def fingerprint(config: PluginConfig) -> Fingerprint:
    """Healthy only when QEMU runs and the configured accelerator can be used."""
    kvm = probe_kvm()
    attrs: dict[str, AttributeValue] = {
        "driver.vm.version": __version__,
        "driver.vm.kvm": kvm.usable,
        # VMs get a qemu-guest-agent channel; the guest must run the agent to use it.
        "driver.vm.guest_agent": True,
    }
    try:
        transport = choose_share_transport(config.share_transport, config.virtiofsd_binary)
    except ConfigError as exc:
        return Fingerprint(Health.UNHEALTHY, str(exc), attrs)
    # How Nomad's directories and volumes reach the guest.
    attrs["driver.vm.fs_transport"] = transport.name
    attrs["driver.vm.fs_transport.reason"] = transport.reason
    if transport.virtiofsd is not None:
        attrs["driver.vm.virtiofsd"] = str(transport.virtiofsd)
    try:
        binary = find_qemu(config.qemu_binary)
        attrs["driver.vm.qemu.version"] = qemu_version(binary)
        attrs["driver.vm.qemu.binary"] = str(binary)
    except HypervisorError as exc:
        return Fingerprint(Health.UNHEALTHY, str(exc), attrs)
    try:
        accel = choose_accelerator(config.accelerator, kvm)
    except ConfigError as exc:
        return Fingerprint(Health.UNHEALTHY, str(exc), attrs)
    attrs["driver.vm.accelerator"] = accel.name
    if config.network is not None:
        attrs.update(network_attributes(config.network))
    description = "Healthy" if accel.name == "kvm" else f"Healthy ({accel.reason})"
    return Fingerprint(Health.HEALTHY, description, attrs)


async def fingerprint_async(config: PluginConfig) -> Fingerprint:
    # The KVM probe and `qemu --version` run child processes: keep them off the event loop.
    return await asyncio.to_thread(fingerprint, config)


def network_attributes(net: BridgeNetwork) -> dict[str, AttributeValue]:
    """The bridge VMs attach to, and whether a VM start can use it: it exists and is a bridge,
    or the plugin will create it (``create_bridge``)."""
    try:
        state = links.bridge_state(net.bridge)
        exists = state.exists and state.is_bridge
    except NetworkError:
        exists = False
    return {
        "driver.vm.network.bridge": net.bridge,
        "driver.vm.network.subnet": str(net.subnet),
        "driver.vm.network.bridge_exists": exists,
        "driver.vm.network.usable": exists or net.create_bridge,
        "driver.vm.network.dhcp": net.dnsmasq is not None,
    }
