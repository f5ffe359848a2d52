"""`nomad-vm doctor`: is this host ready to run VM tasks? Prints one line per check."""

from __future__ import annotations

import shutil

from nomad_vm.errors import ConfigError, HypervisorError, NetworkError, VMRequestError
from nomad_vm.network import links
from nomad_vm.network.settings import find_dnsmasq
from nomad_vm.storage.ceph_support import ceph_problem
from nomad_vm.storage.limits import find_prlimit
from nomad_vm.vm.accel import choose_accelerator, probe_kvm
from nomad_vm.vm.capabilities import HostSettings
from nomad_vm.vm.qemu.binary import find_qemu, find_qemu_img, qemu_version
from nomad_vm.vm.registry import HypervisorRegistry
from nomad_vm.vm.share_transport import choose_share_transport
from nomad_vm.vm.vmm_user import resolve_vmm_user, runs_as


def run_doctor(
    qemu_binary: str,
    accelerator: str,
    bridge: str | None = None,
    ch_binary: str = "cloud-hypervisor",
    vm_user: str = "nomad-vm",
) -> int:
    failures = 0
    try:
        user = resolve_vmm_user(vm_user)
        who = user.describe() if user else f"{runs_as(None)} (the plugin's own user)"
        print(f"ok    QEMU and virtiofsd will run as {who}")
    except VMRequestError as exc:
        print(f"FAIL  {exc}")
        failures += 1
    try:
        binary = find_qemu(qemu_binary)
        print(f"ok    QEMU {qemu_version(binary)} at {binary}")
    except HypervisorError as exc:
        print(f"FAIL  {exc}")
        failures += 1
    try:
        print(f"ok    qemu-img at {find_qemu_img()}")
    except HypervisorError as exc:
        print(f"warn  {exc} (needed for disk images)")
    try:
        print(f"ok    prlimit at {find_prlimit()} (limits qemu-img on jobs' images)")
    except HypervisorError as exc:
        print(f"warn  {exc} (needed for disk images: qemu-img runs on them under limits)")
    kvm = probe_kvm()
    print(
        f"{'ok  ' if kvm.usable else 'info'}  KVM {'usable' if kvm.usable else 'not usable'}: "
        f"{kvm.reason}"
    )
    try:
        accel = choose_accelerator(accelerator, kvm)
        print(f"ok    accelerator {accelerator!r} -> {accel.name}: {accel.reason}")
    except VMRequestError as exc:
        print(f"FAIL  {exc}")
        failures += 1
    shares = choose_share_transport("auto", None)
    level = "warn" if shares.fallback else "ok  "
    print(f"{level}  shares: {shares.reason}")
    _check_cloud_hypervisor(ch_binary, vm_user)
    ceph = ceph_problem(qemu_binary)
    if ceph:
        print(f"warn  Ceph pools cannot be used: {ceph}")
    else:
        print("ok    Ceph pools can be used (QEMU's rbd driver and the Ceph bindings load)")
    if bridge:
        failures += _check_bridge(bridge)
    print("host is ready" if not failures else f"{failures} problem(s) found")
    return 1 if failures else 0


def _check_cloud_hypervisor(binary: str, vm_user: str = "nomad-vm") -> None:
    """Cloud Hypervisor is optional (tasks use QEMU unless they ask for it): never a failure,
    but say whether it can run here and why not, as the fingerprint does."""
    backend = HypervisorRegistry().get("cloud-hypervisor")
    facts = backend.check_host(HostSettings(binary, "auto", "auto", "", vm_user, seccomp=True))
    version = dict(facts.attributes).get("cloud_hypervisor.version")
    found = f"Cloud Hypervisor {version}" if version else "Cloud Hypervisor"
    if facts.problem is None:
        print(f'ok    {found} can run VMs here (hypervisor = "cloud-hypervisor")')
        return
    print(f"info  {found}: {facts.problem}")
    if facts.accelerator is None and not facts.kvm.usable and "KVM" not in str(facts.problem):
        print(f"info  Cloud Hypervisor would also need a KVM that runs guests: {facts.kvm.reason}")


def _check_bridge(name: str) -> int:
    """The bridge a plugin `network` block names: present and up, and nft to forward ports."""
    problems = 0
    try:
        state = links.bridge_state(name)
    except NetworkError as exc:
        print(f"FAIL  bridge {name}: {exc}")
        return 1
    if not state.exists or not state.is_bridge:
        what = "is not a bridge" if state.exists else "does not exist"
        print(f"FAIL  bridge {name} {what} (create it, or set create_bridge = true)")
        problems += 1
    else:
        addresses = ", ".join(str(a) for a in state.addresses) or "no address"
        print(f"ok    bridge {name} {'up' if state.up else 'DOWN'}, {addresses}")
    if shutil.which("nft") is None:
        print("FAIL  nft not found: port forwards need nftables (Debian package nftables)")
        problems += 1
    try:  # only needed with dhcp = true, so never a failure
        print(f"ok    DHCP mode possible: dnsmasq at {find_dnsmasq(None)}")
    except ConfigError as exc:
        print(f"info  DHCP mode (network.dhcp) unavailable: {exc.reason}")
    return problems
