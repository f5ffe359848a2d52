"""The VMSpec of one QEMU launch: the plan, the devices the driver prepared, the firmware's
files and the descriptors handed over (``nomad_vm.vm.handover``), put together."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from nomad_vm.errors import HypervisorError
from nomad_vm.storage.held import FileHolder, HeldFile, open_own
from nomad_vm.vm.firmware import FirmwarePlan
from nomad_vm.vm.handover import Handover
from nomad_vm.vm.qemu.plan import QemuPlan
from nomad_vm.vm.qemu.running import AGENT_SOCKET, QMP_SOCKET, SERIAL_SOCKET
from nomad_vm.vm.request import LaunchDevices, VMPlan
from nomad_vm.vm.spec import VMSpec
from nomad_vm.vm.virtiofsd import ShareDaemon


def with_daemon_ends(spec: VMSpec, daemons: list[ShareDaemon]) -> VMSpec:
    """The spec with each virtio-fs share's connected descriptor (QEMU's end)."""
    if not daemons:
        return spec
    ends = {d.share.tag: d.qemu_end.fileno() for d in daemons if d.qemu_end is not None}
    shares = tuple(replace(s, socket_fd=ends.get(s.tag)) for s in spec.shares)
    return replace(spec, shares=shares)


def open_firmware(
    plan: FirmwarePlan, vars_path: Path, holder: FileHolder
) -> tuple[HeldFile, HeldFile]:
    """The UEFI code (read-only) and the task's variable store (read-write), for QEMU."""
    try:
        code = open_own(plan.code, holder, writable=False, follow_symlinks=True)
        return code, open_own(vars_path, holder, writable=True)
    except OSError as exc:
        raise HypervisorError(f"cannot open the UEFI firmware for QEMU: {exc}") from exc


def build_spec(
    plan: VMPlan,
    details: QemuPlan,
    devices: LaunchDevices,
    firmware_code: HeldFile | None = None,
    firmware_vars: HeldFile | None = None,
    handed: Handover | None = None,
) -> VMSpec:
    """The VM's spec; with ``handed``, the QMP, agent and serial console sockets are bound
    now (by the plugin, at their usual paths) and each shared directory opened: QEMU and its
    daemons get descriptors (``nomad_vm.vm.handover``). The console's output also goes to
    ``devices.console_fd`` (the task's stdout), through QEMU's own copy of it."""
    request = plan.request
    control_socket = plan.runtime_dir / QMP_SOCKET
    agent_socket = plan.runtime_dir / AGENT_SOCKET
    serial_socket = plan.runtime_dir / SERIAL_SOCKET
    return VMSpec(
        name=request.name,
        vcpus=request.vcpus,
        memory_mb=request.memory_mb,
        kernel=devices.kernel,
        initramfs=devices.initramfs,
        cmdline=request.cmdline,
        accelerator=plan.accelerator.name,
        control_socket=control_socket,
        disk=devices.disk,
        extra_disks=devices.extra_disks,
        machine=details.machine,
        firmware=details.firmware,
        firmware_code=firmware_code,
        firmware_vars=firmware_vars,
        seed=devices.seed,
        agent_socket=agent_socket,
        shares=tuple(replace(s, host_fd=handed.directory(s.host_path)) for s in plan.shares)
        if handed
        else plan.shares,
        share_transport=plan.share_transport.name,
        nics=devices.nics,
        control_fd=handed.listen(control_socket) if handed else None,
        agent_fd=handed.listen(agent_socket) if handed else None,
        serial_socket=serial_socket if handed else None,
        serial_fd=handed.listen(serial_socket) if handed else None,
        console_log_fd=devices.console_fd if handed else None,
        seccomp=details.seccomp,
        mem_merge=details.mem_merge,
        free_page_reporting=request.free_page_reporting,
        hugepages=request.hugepages,
        memory_max_mb=request.memory_max_mb,
        pin_cpus=request.pin_cpus,
        display=request.display,
        display_socket=plan.display_socket,
        hyperv=details.hyperv.flags,
        rtc_localtime=request.rtc_localtime,
        seed_bus="sata" if request.seed_cdrom else "virtio",
        incoming_fd=devices.restore_fd,
    )
