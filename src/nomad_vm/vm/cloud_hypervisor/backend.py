"""The Cloud Hypervisor backend: check the host, plan a VM, launch it, find it again.

Launch order, as with QEMU: one virtiofsd per share (forked gated, recorded, released), then
``cloud-hypervisor`` with the API socket and the event monitor the plugin made in the task's
runtime dir (gated, recorded with its API socket, released), and once its API answers, the VM
is defined (``vm.create``, the definition built by ``vm_config``) and booted (``vm.boot``). CH
never sees a command line VM: nothing boots until the plugin has recorded the VMM.

CH and its virtiofsd run as ``vm_user`` with no_new_privs, as QEMU does; what CH is handed
and how it names it is ``vmm_files``. CH's own seccomp filter stays on unless
``cloud_hypervisor.seccomp`` says otherwise.

CH's ``vm.create`` takes no TAP descriptors (its HTTP handler drops them), so a TAP that lives
in another network namespace (Nomad's group network mode) is reached by name, with CH started
inside that namespace (``nsenter`` as root, then ``setpriv`` to ``vm_user``; the namespace
taken from the TAP's descriptor with ``TUNGETDEVNETNS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from nomad_vm.errors import HypervisorError, LaunchError, NomadVMError, VMRequestError
from nomad_vm.processes import is_same_process
from nomad_vm.storage.held import FileHolder
from nomad_vm.vm.accel import AcceleratorChoice, KvmStatus, probe_kvm
from nomad_vm.vm.capabilities import HostFacts, HostSettings, HypervisorCapabilities
from nomad_vm.vm.cloud_hypervisor import snapshot
from nomad_vm.vm.cloud_hypervisor.binary import cloud_hypervisor_version, find_cloud_hypervisor
from nomad_vm.vm.cloud_hypervisor.client import ChClient, connect_when_ready
from nomad_vm.vm.cloud_hypervisor.files import API_SOCKET, LOG_NAME, VMM_DIR
from nomad_vm.vm.cloud_hypervisor.model import VmConfig, to_json
from nomad_vm.vm.cloud_hypervisor.netns import nsenter_argv, tap_namespace
from nomad_vm.vm.cloud_hypervisor.running import CloudHypervisorVM, LogSpot
from nomad_vm.vm.cloud_hypervisor.vm_config import (
    AGENT_PORT,
    GUEST_CID,
    CloudHypervisorPlan,
    build_vm_config,
    vmm_argv,
)
from nomad_vm.vm.cloud_hypervisor.vmm_files import (
    VmmFiles,
    give_sockets,
    hand_over,
    let_go_of_taps,
    make_vmm_dir,
)
from nomad_vm.vm.handover import Handover, handover
from nomad_vm.vm.hypervisor import VMM_ROLE, LaunchRecorder, VMRef
from nomad_vm.vm.launching import is_running, record_and_release
from nomad_vm.vm.process import SupervisedProcess, reattach, spawn
from nomad_vm.vm.request import LaunchDevices, VMPlan, VMRequest
from nomad_vm.vm.share_transport import ShareTransport, choose_share_transport
from nomad_vm.vm.virtiofsd import (
    ShareDaemon,
    early_exit_report,
    kill_daemons,
    start_daemons,
    with_sockets,
)
from nomad_vm.vm.vmm_user import VMMUser, check_kvm_access, resolve_vmm_user, runs_as

log = logging.getLogger(__name__)

NAME = "cloud-hypervisor"
HELPER_ROLE = "virtiofsd"
API_READY_TIMEOUT = 30.0
KVM_DEVICE = Path("/dev/kvm")

CAPABILITIES = HypervisorCapabilities(
    # CH has no software emulation.
    accelerators=("kvm",),
    # "bios" only as the default of a VM that boots a kernel directly: CH has no BIOS.
    firmware_kinds=("bios", "uefi"),
    disk_boot_firmware=("uefi",),
    machine_types=("cloud-hypervisor",),
    arches=("x86_64",),
    share_transports=("virtiofs",),
    # qemu-ga over vsock (CH has no virtio-serial), set up in the guest by the cloud-init
    # seed: exec and signals; no terminal sessions (they hot-plug virtio-serial ports).
    guest_agent=True,
    terminal_hotplug=False,
    # vm.pause / vm.resume; vm.snapshot / vm.restore (``snapshot``).
    pause=True,
    snapshot=True,
    # BalloonConfig.free_page_reporting, as the task's option asks.
    free_page_reporting=True,
    # --no-shutdown keeps the VMM after a guest power-off; the event file keeps the panic.
    verdict_survives_plugin_absence=True,
    # CH has no VNC server (its only graphics are a virtio-gpu over vhost-user, shown by
    # nothing here): a task that asks for a display is refused naming `display`.
    displays=("none",),
    guest_agent_vsock=(GUEST_CID, AGENT_PORT),
)


class CloudHypervisor:
    """Cloud Hypervisor on KVM (probed, or trusted with ``cloud_hypervisor.trust_kvm``)."""

    name = NAME
    capabilities = CAPABILITIES

    def check_host(self, settings: HostSettings) -> HostFacts:
        kvm = kvm_status(settings)
        facts = HostFacts(kvm)
        with contextlib.suppress(NomadVMError):  # only shares need it: a plan-time refusal
            facts = replace(facts, share_transport=_virtio_fs(settings))
        try:
            binary = find_cloud_hypervisor(settings.binary)
            version = cloud_hypervisor_version(binary)
            user = resolve_vmm_user(settings.vm_user)
        except NomadVMError as exc:
            return replace(facts, problem=exc)
        attributes = (
            ("cloud_hypervisor.version", version),
            ("cloud_hypervisor.binary", str(binary)),
            ("cloud_hypervisor.vm_user", runs_as(user)),
        )
        facts = replace(facts, attributes=attributes)
        try:
            accelerator = kvm_accelerator(kvm)
            check_vm_user_kvm(user, settings)
            return replace(facts, accelerator=accelerator)
        except NomadVMError as exc:
            return replace(facts, problem=exc)

    async def plan(self, request: VMRequest, settings: HostSettings, runtime_dir: Path) -> VMPlan:
        # Whether CH can run here at all comes first: it is the reason a task fails on this node.
        binary = find_cloud_hypervisor(settings.binary)
        # The KVM probe runs a child process (once per plugin process): keep it off the loop.
        kvm = await asyncio.to_thread(kvm_status, settings)
        accelerator = kvm_accelerator(kvm)
        user = resolve_vmm_user(settings.vm_user)
        check_vm_user_kvm(user, settings)
        firmware = None
        if request.kernel is None:
            if settings.firmware_file is None:
                raise VMRequestError(
                    "firmware_file",
                    "is unset, and this VM has no kernel: Cloud Hypervisor boots a disk with "
                    "its firmware (CLOUDHV.fd or rust-hypervisor-firmware); set it, or give "
                    "the task a kernel (or the plugin a cloud_hypervisor.default_kernel)",
                )
            firmware = settings.firmware_file
        elif request.firmware != "bios":
            raise VMRequestError(
                "firmware",
                f"{request.firmware!r} with a kernel: Cloud Hypervisor boots a kernel directly "
                "(no firmware runs), so leave firmware unset, or boot the disk without a kernel",
            )
        transport = ShareTransport("virtiofs", None, "no shares")
        shares = request.shares
        if shares:
            try:
                transport = _virtio_fs(settings)
            except VMRequestError as exc:
                raise VMRequestError(
                    exc.option,
                    f"Cloud Hypervisor shares directories only over virtio-fs: {exc.reason} "
                    "(or set share_task_dirs = false and mount no volumes)",
                ) from None
            # In CH's working directory: it connects to them by name (vmm_files).
            shares = with_sockets(shares, runtime_dir / VMM_DIR)
        details = CloudHypervisorPlan(
            binary=str(binary),
            firmware=firmware,
            seccomp=settings.seccomp_mode,
            log_file=settings.log_file,
            user=user,
        )
        return VMPlan(NAME, request, runtime_dir, accelerator, transport, shares, details)

    async def launch(
        self, plan: VMPlan, devices: LaunchDevices, recorder: LaunchRecorder
    ) -> CloudHypervisorVM:
        details = _details(plan)
        vmm_dir = make_vmm_dir(plan.runtime_dir, details.user)
        with FileHolder() as holder, handover() as handed:
            files = hand_over(
                plan.runtime_dir, devices, details.firmware, details.user, handed, holder
            )
            config = build_vm_config(plan, files.firmware, devices)
            if devices.restore_fd is not None:
                await asyncio.to_thread(_unpack_snapshot, devices.restore_fd, vmm_dir, config)
            daemons = self._start_daemons(plan, handed)
            try:
                helpers = [d.process for d in daemons]
                await record_and_release(recorder, helpers, HELPER_ROLE)
                process, log_spot = self._spawn(plan, details, devices, files, daemons)
            finally:
                for daemon in daemons:
                    daemon.close()
        socket = plan.runtime_dir / API_SOCKET
        await record_and_release(recorder, [process], VMM_ROLE, helpers, socket)
        client = await self._connect(socket, process, daemons, log_spot)
        vm = CloudHypervisorVM(
            process, client, plan.runtime_dir, tuple(d.process for d in daemons), log_spot
        )
        try:
            if devices.restore_fd is None:
                await client.create(config)
                await client.boot()
            else:
                # The VM comes back paused; a start runs it (as QEMU's restore does).
                await client.restore(snapshot.url(snapshot.RESTORE_DIR), snapshot.RESTORE_TIMEOUT)
                await client.resume()
        except HypervisorError as exc:
            await self._failed(process, daemons, client, log_spot, str(exc))
        finally:
            if devices.restore_fd is not None:
                # CH has copied guest memory in (or failed): the way station goes.
                await asyncio.to_thread(snapshot.remove_dir, vmm_dir / snapshot.RESTORE_DIR)
        return vm

    def _start_daemons(self, plan: VMPlan, handed: Handover) -> list[ShareDaemon]:
        """One virtiofsd per share, as vm_user, each on a socket the plugin bound in CH's
        working directory and a descriptor of its shared directory (``vm.handover``)."""
        if not plan.shares:
            return []
        binary = plan.share_transport.virtiofsd
        if binary is None:
            raise ValueError("virtio-fs shares need the virtiofsd binary")
        user = _details(plan).user
        shares = plan.shares
        if user is not None:
            # vm_user cannot reach the shared directory by path (Nomad's data_dir is 0700). As
            # root, virtiofsd sandboxes itself in namespaces, where it cannot enter the new
            # root through /proc/self/fd/N, so it gets the path.
            shares = tuple(replace(s, host_fd=handed.directory(s.host_path)) for s in shares)
        daemons = start_daemons(binary, shares, plan.runtime_dir, gated=True, user=user)
        try:
            give_sockets([s.socket for s in shares if s.socket is not None], user)
        except BaseException:
            kill_daemons(daemons)
            raise
        return daemons

    def _spawn(
        self,
        plan: VMPlan,
        details: CloudHypervisorPlan,
        devices: LaunchDevices,
        files: VmmFiles,
        daemons: list[ShareDaemon],
    ) -> tuple[SupervisedProcess, LogSpot]:
        """CH, forked at its gate as vm_user: serial on stdout (the task's), its messages to
        the log, its working directory the one it owns (``vmm_files``)."""
        runtime = plan.runtime_dir
        argv = vmm_argv(details, files.api_fd, files.events_fd)
        if details.user is not None:
            argv = details.user.switch_argv(argv)
        netns_fd = None
        try:
            log_path = details.log_file or runtime / LOG_NAME
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
            flags |= os.O_APPEND if details.log_file else os.O_TRUNC
            log_fd = os.open(log_path, flags, 0o640 if details.log_file else 0o600)
            try:
                spot = LogSpot(log_path, os.fstat(log_fd).st_size if details.log_file else 0)
                netns_fd = tap_namespace([nic.fd for nic in devices.nics if nic.fd is not None])
                let_go_of_taps(devices.nics)
                if netns_fd is not None:
                    # nsenter needs root: it enters the namespace, then setpriv drops to vm_user.
                    argv = [*nsenter_argv(netns_fd), *argv]
                inherited = [*files.fds, *([netns_fd] if netns_fd is not None else [])]
                process = spawn(
                    argv,
                    stdout=devices.console_fd,
                    stderr=log_fd,
                    cwd=runtime / VMM_DIR,
                    pass_fds=inherited,
                    gated=True,
                )
            finally:
                os.close(log_fd)
        except BaseException:
            kill_daemons(daemons)
            raise
        finally:
            if netns_fd is not None:
                os.close(netns_fd)
        log.debug("started cloud-hypervisor", extra={"fields": {"pid": process.pid}})
        return process, spot

    async def _connect(
        self,
        socket: Path,
        process: SupervisedProcess,
        daemons: list[ShareDaemon],
        log_spot: LogSpot,
    ) -> ChClient:
        async def running() -> bool:
            return is_running(process)

        try:
            client, _ = await connect_when_ready(socket, running, API_READY_TIMEOUT)
        except HypervisorError as exc:
            await self._failed(process, daemons, None, log_spot, str(exc))
        return client

    async def _failed(
        self,
        process: SupervisedProcess,
        daemons: list[ShareDaemon],
        client: ChClient | None,
        log_spot: LogSpot,
        what: str,
    ) -> NoReturn:
        """End what the launch started and raise LaunchError with the best explanation: a
        share daemon that failed first, else CH's own words (its log), else ``what``."""
        cause = early_exit_report(daemons)
        if client is not None:
            await client.close()
        await process.terminate(grace=2.0)
        kill_daemons(daemons)
        process.close()
        said = log_spot.tail()
        detail = cause or (f"{what}; its log: {said}" if said else what)
        raise LaunchError(f"Cloud Hypervisor failed to start the VM: {detail}")

    async def reattach(self, ref: VMRef) -> CloudHypervisorVM:
        """Find a CH started by an earlier plugin process (pid + start ticks, then vm.info)."""
        process = reattach(ref.vmm)
        client: ChClient | None = ChClient(ref.control_socket)
        assert client is not None
        try:
            await client.info()
        except HypervisorError as exc:
            # The process is ours but its API is unusable: watch it, stop it by signal.
            log.warning("reattached without the Cloud Hypervisor API: %s", exc)
            await client.close()
            client = None
        helpers = tuple(reattach(h) for h in ref.helpers if is_same_process(h))
        vm = CloudHypervisorVM(process, client, ref.runtime_dir, helpers)
        await vm.check_finished_meanwhile()
        return vm


def _unpack_snapshot(fd: int, vmm_dir: Path, config: VmConfig) -> None:
    """The saved state where CH restores it from, with this start's definition (``snapshot``)."""
    directory = snapshot.fresh_dir(vmm_dir, snapshot.RESTORE_DIR)
    try:
        snapshot.unpack(fd, directory, json.dumps(to_json(config)).encode())
    except BaseException:
        snapshot.remove_dir(directory)
        raise


def kvm_status(settings: HostSettings) -> KvmStatus:
    if not settings.trust_kvm:
        return probe_kvm()
    if KVM_DEVICE.exists():
        return KvmStatus(True, "trusted without the probe (cloud_hypervisor.trust_kvm = true)")
    return KvmStatus(False, f"{KVM_DEVICE} does not exist (cloud_hypervisor.trust_kvm is on)")


def check_vm_user_kvm(user: VMMUser | None, settings: HostSettings) -> None:
    """Can vm_user open /dev/kvm? Not asked with trust_kvm: the operator vouches for KVM, and
    CH's own error (in the launch failure) says it if it cannot."""
    if not settings.trust_kvm:
        check_kvm_access(user)


def kvm_accelerator(kvm: KvmStatus) -> AcceleratorChoice:
    if kvm.usable:
        return AcceleratorChoice("kvm", kvm.reason)
    raise HypervisorError(
        f"Cloud Hypervisor cannot run here: it needs KVM and has no software emulation, and "
        f'KVM cannot run guests on this host ({kvm.reason}); use hypervisor = "qemu", or set '
        "cloud_hypervisor.trust_kvm = true if the probe is wrong"
    )


def _virtio_fs(settings: HostSettings) -> ShareTransport:
    return choose_share_transport("virtiofs", settings.virtiofsd_binary)


def _details(plan: VMPlan) -> CloudHypervisorPlan:
    if not isinstance(plan.details, CloudHypervisorPlan):
        raise TypeError(f"a {plan.backend} plan cannot be launched by Cloud Hypervisor")
    return plan.details
