"""What the node reports about this driver: health and `driver.vm.*` attributes (under a seed
driver's name, `driver.virt.*` or `driver.nomad-driver-ch.*`: nomad_vm.identity)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from nomad_vm import __version__
from nomad_vm.driver.backend_options import check_settings, config_error, host_settings
from nomad_vm.driver.cgroup_plan import cgroup_attribute
from nomad_vm.driver.config import PluginConfig
from nomad_vm.driver.ksm import KsmOutcome, ksm_attributes
from nomad_vm.driver.types import AttributeValue, Fingerprint, Health
from nomad_vm.errors import NetworkError, NomadVMError, VMRequestError
from nomad_vm.network import links
from nomad_vm.network.settings import BridgeNetwork
from nomad_vm.storage.ceph_support import ceph_problem
from nomad_vm.vm.capabilities import HostFacts, HostSettings
from nomad_vm.vm.hypervisor import Hypervisor

ATTRIBUTE_PREFIX = "driver.vm."


def fingerprint(
    config: PluginConfig,
    backend: Hypervisor,
    others: Sequence[Hypervisor] = (),
    ksm: KsmOutcome | None = None,
) -> Fingerprint:
    """The fingerprint with its attributes under the installed name's prefix (the attributes
    below are written as `driver.vm.*`), and what the seed drivers' ignored keys amount to.
    ``ksm``: what applying the plugin's `ksm` block did (driver/ksm.py)."""
    found = _fingerprint(config, backend, others)
    transport = found.attributes.get(ATTRIBUTE_PREFIX + "fs_transport")
    merging = ksm_attributes(config.ksm, ksm or KsmOutcome(), virtiofs=transport == "virtiofs")
    prefix = config.identity.attribute_prefix
    attrs: dict[str, AttributeValue] = {
        prefix + key.removeprefix(ATTRIBUTE_PREFIX): value
        for key, value in {**found.attributes, **merging}.items()
    }
    attrs.update(config.seed.attributes(prefix))
    description = found.description
    # Which cgroup version the tasks' VMMs run under (nomad_vm.vm.cgroups).
    cgroups = cgroup_attribute(config)
    attrs[prefix + "cgroups"] = cgroups
    if cgroups == "none":
        description += "; no cgroup file system: VMs run without CPU weight or memory limits"
    if config.seed.ceph:
        # Ceph pools need QEMU's rbd driver and the bindings: say which is missing, on the
        # node (tasks that use such a pool are refused with the same reason).
        problem = ceph_problem(config.qemu_binary)
        attrs[prefix + "storage_pools.ceph"] = problem or "usable"
        if problem is not None:
            description += f"; Ceph pools {', '.join(config.seed.ceph)} unusable: {problem}"
    if not config.identity.is_own_name:
        # Which seed driver this name stands in for, for constraints and for the operator.
        attrs[prefix + "stands_in_for"] = config.identity.seed
    return Fingerprint(found.health, description, attrs)


def _fingerprint(
    config: PluginConfig, backend: Hypervisor, others: Sequence[Hypervisor] = ()
) -> Fingerprint:
    """Healthy only when ``backend`` (the plugin's default hypervisor) can run VMs here with the
    configured settings. Every backend, ``others`` too, says whether it can run here and why
    not (``driver.vm.<backend>.usable``/``.reason``): a job may constrain on it."""
    attrs = _base_attributes()
    for other in others:
        other_facts, problem = _check(config, other)
        if other_facts is not None:
            attrs.update(_backend_attributes(other_facts))
        attrs.update(_usability(other, problem))
    facts, problem = _check(config, backend)
    if facts is not None:
        attrs.update(_base_attributes(facts))
    # The guest gets a qemu-guest-agent channel (the guest must run the agent to use it).
    attrs["driver.vm.guest_agent"] = backend.capabilities.guest_agent
    attrs.update(_usability(backend, problem))
    if problem is not None:
        return Fingerprint(Health.UNHEALTHY, problem, attrs)
    assert facts is not None
    if facts.accelerator is None:  # a backend that found no problem always chose one
        return Fingerprint(Health.UNHEALTHY, "no accelerator could be chosen", attrs)
    attrs["driver.vm.accelerator"] = facts.accelerator.name
    if config.network is not None:
        attrs.update(network_attributes(config.network))
    reason = facts.accelerator.reason
    description = "Healthy" if facts.accelerator.name == "kvm" else f"Healthy ({reason})"
    return Fingerprint(Health.HEALTHY, description, attrs)


def _check(config: PluginConfig, backend: Hypervisor) -> tuple[HostFacts | None, str | None]:
    """What the backend found on this host, and why it cannot run VMs here (None: it can)."""
    settings = host_settings(config, backend.name)
    try:
        check_settings(backend.name, backend.capabilities, settings)
    except VMRequestError as exc:
        return None, str(config_error(exc, settings))
    facts = backend.check_host(settings)
    if facts.problem is None:
        return facts, None
    return facts, _describe(facts.problem, settings)


def _usability(backend: Hypervisor, problem: str | None) -> dict[str, AttributeValue]:
    prefix = ATTRIBUTE_PREFIX + backend.name.replace("-", "_")
    return {f"{prefix}.usable": problem is None, f"{prefix}.reason": problem or "usable"}


def _backend_attributes(facts: HostFacts) -> dict[str, AttributeValue]:
    return {ATTRIBUTE_PREFIX + name: value for name, value in facts.attributes}


def _base_attributes(facts: HostFacts | None = None) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "driver.vm.version": __version__,
    }
    if facts is None:
        return attrs
    attrs["driver.vm.kvm"] = facts.kvm.usable
    transport = facts.share_transport
    if transport is not None:
        # How Nomad's directories and volumes reach the guest.
        attrs["driver.vm.fs_transport"] = transport.name
        attrs["driver.vm.fs_transport.reason"] = transport.reason
        if transport.virtiofsd is not None:
            attrs["driver.vm.virtiofsd"] = str(transport.virtiofsd)
    attrs.update(_backend_attributes(facts))
    return attrs


def _describe(problem: NomadVMError, settings: HostSettings) -> str:
    """The health description: a setting at fault is named as the plugin config field."""
    if isinstance(problem, VMRequestError):
        return str(config_error(problem, settings))
    return str(problem)


async def fingerprint_async(
    config: PluginConfig,
    backend: Hypervisor,
    others: Sequence[Hypervisor] = (),
    ksm: KsmOutcome | None = None,
) -> Fingerprint:
    # The KVM probe and `qemu --version` run child processes: keep them off the event loop.
    return await asyncio.to_thread(fingerprint, config, backend, others, ksm)


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
