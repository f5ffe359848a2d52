"""The QEMU backend: check the host, plan a VM, launch it, find it again.

The running VM itself (events, wait, stop, usage) is ``running.QemuVM``; the command line is
``argv.qemu_argv`` (a pure function). Launch order: the task's UEFI variable store (when the
firmware is UEFI), one virtiofsd per share (virtio-fs), then QEMU; every process is forked
gated, reported to the recorder, and only then released, so the task's journal knows it
before it runs. The daemons are released before QEMU is forked: QEMU's vhost-user handshake
waits for them, and their head start keeps StartTask as fast as it was without the gate.
QEMU opens no file by name: the driver's files (disk, backing chain, seed, kernel) and the
firmware's (opened here) are inherited descriptors (``files_argv``), closed in the plugin once
QEMU is forked; QEMU inherits exactly those of its own task (``spawn`` closes all others).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from pathlib import Path

from nomad_vm.errors import HypervisorError, LaunchError, NomadVMError, VMRequestError
from nomad_vm.files import read_log_tail
from nomad_vm.processes import is_same_process
from nomad_vm.storage.held import FileHolder
from nomad_vm.storage.rbd_keys import key_memfd
from nomad_vm.vm.accel import choose_accelerator, probe_kvm
from nomad_vm.vm.capabilities import HostFacts, HostSettings, HypervisorCapabilities
from nomad_vm.vm.firmware import FIRMWARE_KINDS, VARS_FILE, plan_firmware
from nomad_vm.vm.firmware import prepare_vars as prepare_firmware_vars
from nomad_vm.vm.handover import handover
from nomad_vm.vm.hugepages import check_hugepages
from nomad_vm.vm.hyperv import choose_hyperv
from nomad_vm.vm.hypervisor import VMM_ROLE, LaunchRecorder, VMRef
from nomad_vm.vm.launching import is_running, record_and_release
from nomad_vm.vm.machine import ARCHES, MACHINE_TYPES, MachineConfig, validate_machine
from nomad_vm.vm.process import SupervisedProcess, reattach, spawn
from nomad_vm.vm.qemu.argv import qemu_argv
from nomad_vm.vm.qemu.binary import find_qemu, qemu_version
from nomad_vm.vm.qemu.display import DISPLAYS, VNC_SOCKET, check_display, serve_vnc
from nomad_vm.vm.qemu.files_argv import inherited_fds
from nomad_vm.vm.qemu.monitor import QemuMonitor, connect_when_ready
from nomad_vm.vm.qemu.pinning import pin_vcpus
from nomad_vm.vm.qemu.plan import QemuPlan
from nomad_vm.vm.qemu.running import LOG_NAME, QemuVM
from nomad_vm.vm.qemu.snapshot import run_restored
from nomad_vm.vm.qemu.spec_build import build_spec, open_firmware, with_daemon_ends
from nomad_vm.vm.request import LaunchDevices, VMPlan, VMRequest
from nomad_vm.vm.share_transport import choose_share_transport
from nomad_vm.vm.spec import DiskSpec, VMSpec
from nomad_vm.vm.swtpm import ROLE as SWTPM_ROLE
from nomad_vm.vm.swtpm import TpmDaemon, find_swtpm, start_swtpm
from nomad_vm.vm.virtiofsd import (
    ShareDaemon,
    early_exit_report,
    kill_daemons,
    start_daemons,
    with_sockets,
)
from nomad_vm.vm.vmm_user import VMMUser, check_kvm_access, resolve_vmm_user, runs_as

log = logging.getLogger(__name__)

NAME = "qemu"
# How long QEMU may take to create its QMP socket. It is milliseconds normally; a loaded CI host
# with several TCG guests booting can stretch it.
QMP_READY_TIMEOUT = 30.0
# How long QEMU may take to load a saved state (-incoming): a few hundred MB from a local file.
RESTORE_TIMEOUT = 300.0
HELPER_ROLE = "virtiofsd"

# virtio-net, and the Intel 82574L that guests without virtio drivers (Windows Setup) know.
NIC_MODELS = ("virtio", "e1000e")

CAPABILITIES = HypervisorCapabilities(
    accelerators=("kvm", "tcg"),
    firmware_kinds=FIRMWARE_KINDS,
    disk_boot_firmware=FIRMWARE_KINDS,
    machine_types=MACHINE_TYPES,
    arches=ARCHES,
    share_transports=("virtiofs", "9p"),
    guest_agent=True,
    terminal_hotplug=True,
    serial_console=True,
    # QMP stop/cont; snapshots are the migration stream to and from a descriptor
    # (``snapshot``).
    pause=True,
    snapshot=True,
    # -action shutdown=pause,panic=pause keeps the guest's verdict in QEMU's run state.
    verdict_survives_plugin_absence=True,
    macvtap=True,
    disk_blocks=True,
    displays=DISPLAYS,
    free_page_reporting=True,
    hugepages=True,
    tpm=True,
    hyperv=True,
    rtc_localtime=True,
    nic_models=NIC_MODELS,
    memory_hotplug=True,
)


class QemuHypervisor:
    """QEMU with KVM when the host really can, TCG otherwise."""

    name = NAME
    capabilities = CAPABILITIES

    def check_host(self, settings: HostSettings) -> HostFacts:
        kvm = probe_kvm()
        try:
            transport = choose_share_transport(settings.share_transport, settings.virtiofsd_binary)
        except NomadVMError as exc:
            return HostFacts(kvm, problem=exc)
        facts = HostFacts(kvm, share_transport=transport)
        try:
            binary = find_qemu(settings.binary)
            user = resolve_vmm_user(settings.vm_user)
            attributes = (
                ("qemu.version", qemu_version(binary)),
                ("qemu.binary", str(binary)),
                ("vm_user", runs_as(user)),
                ("seccomp", str(settings.seccomp).lower()),
            )
        except NomadVMError as exc:
            return replace(facts, problem=exc)
        facts = replace(facts, attributes=attributes)
        try:
            accelerator = choose_accelerator(settings.accelerator, kvm)
            if accelerator.name == "kvm":
                check_kvm_access(user)
            return replace(facts, accelerator=accelerator)
        except NomadVMError as exc:
            return replace(facts, problem=exc)

    async def plan(self, request: VMRequest, settings: HostSettings, runtime_dir: Path) -> VMPlan:
        machine = validate_machine(
            request.arch,
            request.machine,
            request.firmware,
            has_kernel=request.kernel is not None,
            has_disk=request.has_disk,
        )
        check_display(request.display, machine.machine)
        if request.memory_max_mb is not None and machine.machine == "microvm":
            # virtio-mem is a PCI device here, and microvm has no PCI bus.
            raise VMRequestError(
                "memory_max", "microvm has no PCI bus for virtio-mem; use machine pc or q35"
            )
        if request.hugepages:
            check_hugepages(request.memory_mb)
        transport = choose_share_transport(settings.share_transport, settings.virtiofsd_binary)
        shares = request.shares
        if transport.name == "virtiofs":
            shares = with_sockets(shares, runtime_dir)
        # The KVM probe runs a child process (once per plugin process): keep it off the loop.
        kvm = await asyncio.to_thread(probe_kvm)
        accelerator = choose_accelerator(settings.accelerator, kvm)
        user = resolve_vmm_user(settings.vm_user)
        if accelerator.name == "kvm":
            check_kvm_access(user)
        check_pc_devices(request, machine)
        hyperv = choose_hyperv(request.hyperv, accelerator.name)
        binary = find_qemu(settings.binary)
        # Cached per binary; the first call forks `qemu --version`: keep it off the loop.
        version = await asyncio.to_thread(qemu_version, binary)
        details = QemuPlan(
            binary=str(binary),
            machine=machine,
            firmware=plan_firmware(request.firmware),
            user=user,
            seccomp=settings.seccomp,
            mem_merge=settings.mem_merge,
            hyperv=hyperv,
            swtpm=find_swtpm() if request.tpm else None,
        )
        display_socket = runtime_dir / VNC_SOCKET if request.display != "none" else None
        notes = (hyperv.event(),) if hyperv.dropped else ()
        return VMPlan(
            NAME,
            request,
            runtime_dir,
            accelerator,
            transport,
            shares,
            details,
            display_socket=display_socket,
            notes=notes,
            vmm_version=version,
        )

    async def launch(
        self, plan: VMPlan, devices: LaunchDevices, recorder: LaunchRecorder
    ) -> QemuVM:
        """Start QEMU (and the virtiofsd its shares need) and return once its QMP socket
        answers; no process is left on failure."""
        details = _details(plan)
        runtime_dir = plan.runtime_dir
        with FileHolder() as firmware_files, handover() as handed:
            # The firmware's files, opened for QEMU; closed once it holds its own copies.
            code = variables = None
            if details.firmware is not None:
                await recorder.creating("firmware-vars", runtime_dir / VARS_FILE)
                vars_path = await asyncio.to_thread(
                    prepare_firmware_vars, details.firmware, runtime_dir
                )
                code, variables = open_firmware(details.firmware, vars_path, firmware_files)
            spec = build_spec(plan, details, devices, code, variables, handed)
            spec = with_rbd_keys(spec, details.user, firmware_files)
            daemons = self._start_daemons(plan, spec)
            tpm: TpmDaemon | None = None
            try:
                spec = with_daemon_ends(spec, daemons)
                await record_and_release(recorder, [d.process for d in daemons], HELPER_ROLE)
                tpm = self._start_tpm(plan, devices, daemons)
                if tpm is not None:
                    spec = replace(spec, tpm_fd=tpm.qemu_end.fileno())
                    started = [d.process for d in daemons]
                    await record_and_release(recorder, [tpm.process], SWTPM_ROLE, started)
                process = self._spawn_qemu(plan, spec, devices.console_fd, daemons, tpm)
            finally:
                # QEMU (or its gate) holds its own copies now; the plugin keeps none.
                for daemon in daemons:
                    daemon.close()
                if tpm is not None:
                    tpm.close()
        helpers = [d.process for d in daemons] + ([tpm.process] if tpm is not None else [])
        await record_and_release(recorder, [process], VMM_ROLE, helpers, spec.control_socket)
        return await self._connect(spec, process, daemons, runtime_dir, tpm)

    def _start_tpm(
        self, plan: VMPlan, devices: LaunchDevices, daemons: list[ShareDaemon]
    ) -> TpmDaemon | None:
        """The VM's swtpm, forked at its gate (the share daemons are ended if it fails)."""
        details = _details(plan)
        if details.swtpm is None:
            return None
        if devices.tpm_state_fd is None:
            raise ValueError("a VM with a TPM needs the TPM's state directory")
        try:
            return start_swtpm(details.swtpm, devices.tpm_state_fd, plan.runtime_dir, details.user)
        except BaseException:
            kill_daemons(daemons)
            raise

    def _start_daemons(self, plan: VMPlan, spec: VMSpec) -> list[ShareDaemon]:
        """One virtiofsd per share (virtio-fs), forked at their gates."""
        if spec.share_transport != "virtiofs" or not spec.shares:
            return []
        if plan.share_transport.virtiofsd is None:
            raise ValueError("virtio-fs shares need the virtiofsd binary")
        return start_daemons(
            plan.share_transport.virtiofsd,
            spec.shares,
            plan.runtime_dir,
            gated=True,
            user=_details(plan).user,
            connect=True,
        )

    def _spawn_qemu(
        self,
        plan: VMPlan,
        spec: VMSpec,
        console_fd: int,
        daemons: list[ShareDaemon],
        tpm: TpmDaemon | None = None,
    ) -> SupervisedProcess:
        """QEMU, forked at its gate as the plan's user; its messages go to qemu.log."""
        argv = qemu_argv(_details(plan).binary, spec)
        log_path = plan.runtime_dir / LOG_NAME
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                process = spawn(
                    argv,
                    stdout=console_fd,
                    stderr=log_fd,
                    cwd=plan.runtime_dir,
                    pass_fds=inherited_fds(spec),
                    gated=True,
                    user=_details(plan).user,
                )
            finally:
                os.close(log_fd)
        except BaseException:
            kill_daemons(daemons)
            if tpm is not None:
                tpm.process.kill_and_reap()
            raise
        log.debug("started qemu", extra={"fields": {"pid": process.pid, "argv": " ".join(argv)}})
        return process

    async def _connect(
        self,
        spec: VMSpec,
        process: SupervisedProcess,
        daemons: list[ShareDaemon],
        runtime_dir: Path,
        tpm: TpmDaemon | None = None,
    ) -> QemuVM:
        async def running() -> bool:
            return is_running(process)

        try:
            monitor, _ = await connect_when_ready(spec.control_socket, running, QMP_READY_TIMEOUT)
            if spec.incoming_fd is not None:
                await run_restored(monitor, running, RESTORE_TIMEOUT)
        except HypervisorError as exc:
            # A share daemon that failed first is the cause; QEMU only saw "Connection refused".
            cause = "; ".join(
                c for c in (early_exit_report(daemons), tpm and tpm.early_exit_report()) if c
            )
            await process.terminate(grace=2.0)
            kill_daemons(daemons)
            if tpm is not None:
                tpm.process.kill_and_reap()
            tail = read_log_tail(runtime_dir / LOG_NAME)
            process.close()
            if cause:
                raise LaunchError(f"QEMU failed to start: {cause}") from None
            raise LaunchError(f"QEMU failed to start: {tail or exc}") from None
        # Cancelled here (Nomad gave up on StartTask, the agent is shutting down), QEMU and its
        # daemons are ended by the driver's replay of the journal they are recorded in.
        helpers = tuple(d.process for d in daemons) + ((tpm.process,) if tpm is not None else ())
        vm = QemuVM(process, monitor, runtime_dir, helpers)
        try:
            # Hot-pluggable memory is driven on these figures: fresher ones, so that the
            # driver sees a guest running short sooner (memory_watch).
            await vm.enable_guest_stats(1 if spec.memory_max_mb is not None else 2)
            if spec.pin_cpus:
                vm.vcpu_pinning = await pin_vcpus(monitor, spec.pin_cpus)
            if spec.display_socket is not None:
                await serve_vnc(monitor, spec.display_socket)
        except BaseException:
            await monitor.close()
            raise
        return vm

    async def reattach(self, ref: VMRef) -> QemuVM:
        """Find a QEMU started by an earlier plugin process (pid + start time, then QMP)."""
        process = reattach(ref.vmm)
        monitor: QemuMonitor | None = QemuMonitor(ref.control_socket)
        assert monitor is not None
        try:
            await monitor.connect()
        except HypervisorError as exc:
            # The process is ours but QMP is unusable: watch the process, stop by signal.
            log.warning("reattached without QMP: %s", exc)
            await monitor.close()
            monitor = None
        # Its virtiofsd end when it does; watched too, so they are ended with it if not.
        helpers = tuple(reattach(h) for h in ref.helpers if is_same_process(h))
        vm = QemuVM(process, monitor, ref.runtime_dir, helpers)
        await vm.check_finished_meanwhile()
        return vm


def check_pc_devices(request: VMRequest, machine: MachineConfig) -> None:
    """microvm has no PCI bus and no TPM interface: the devices Windows guests need are PC
    devices (VMRequestError naming the option)."""
    if machine.machine != "microvm":
        return
    for option, wanted in (
        ("tpm", request.tpm),
        ("nic_model", request.nic_model != "virtio"),
        ("seed_cdrom", request.seed_cdrom),
    ):
        if wanted:
            raise VMRequestError(
                option, 'microvm has no PCI bus or TPM interface: use os { machine = "q35" }'
            )


def _details(plan: VMPlan) -> QemuPlan:
    if not isinstance(plan.details, QemuPlan):
        raise TypeError(f"a {plan.backend} plan cannot be launched by QEMU")
    return plan.details


def with_rbd_keys(spec: VMSpec, user: VMMUser | None, holder: FileHolder) -> VMSpec:
    """Each RBD disk with its cephx key as a memfd QEMU's user can read (``rbd_keys``)."""

    def keyed(disk: DiskSpec) -> DiskSpec:
        if disk.rbd is None:
            return disk
        key = key_memfd(disk.rbd.pool.secret, holder, user.uid if user is not None else None)
        return replace(disk, rbd=replace(disk.rbd, key=key))

    primary = keyed(spec.disk) if spec.disk is not None else None
    return replace(spec, disk=primary, extra_disks=tuple(keyed(d) for d in spec.extra_disks))
