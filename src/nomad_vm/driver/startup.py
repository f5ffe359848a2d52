"""StartTask's plan: everything that can be checked without touching the host, so a bad job
fails before any file or process exists. The host changes follow in ``start_steps``.

The files the job names (image, kernel, initramfs) are opened here, once, and checked on the
descriptor (``storage.held``); the plan holds them (``StartPlan.files``) until the VMM has its
own copies, and whoever made the plan closes them (``TaskFiles.close``)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from nomad_vm.cloudinit import AgentVsock, CloudInitRequest, GuestMount, SeedDocuments, render
from nomad_vm.driver.backend_options import (
    check_request,
    check_settings,
    check_snapshot_option,
    config_error,
    host_settings,
)
from nomad_vm.driver.cgroup_plan import CgroupPlan, plan_cgroup
from nomad_vm.driver.config import (
    PluginConfig,
    VMTaskConfig,
    parse_task_config,
    task_allowlist,
)
from nomad_vm.driver.macvtap_plan import FIELDS, MACVTAP_FIELD, MacvtapPlan, plan_macvtap
from nomad_vm.driver.network_plan import NetworkPlan, plan_network
from nomad_vm.driver.resources import (
    expand_cpuset,
    memory_max_mb_for,
    memory_mb_for,
    vcpus_for,
)
from nomad_vm.driver.seed_files import read_seed_files
from nomad_vm.driver.shares import task_shares
from nomad_vm.driver.snapshot_store import Restore
from nomad_vm.driver.tpm_state import TPM_STATE_DIR
from nomad_vm.driver.types import AgentInfo, TaskConfig
from nomad_vm.errors import ConfigError, VMRequestError
from nomad_vm.network.macvtap import check_lower_device
from nomad_vm.network.names import DEFAULT_TAP_PREFIX
from nomad_vm.network.settings import MacvtapRequest
from nomad_vm.storage.ceph_support import ceph_problem
from nomad_vm.storage.disk_request import DiskRequest
from nomad_vm.storage.held import FileHolder, HeldFile, open_allowed
from nomad_vm.storage.paths import Allowlist
from nomad_vm.vm.capabilities import HypervisorCapabilities
from nomad_vm.vm.hypervisor import Hypervisor
from nomad_vm.vm.registry import HypervisorRegistry
from nomad_vm.vm.request import VMPlan, VMRequest
from nomad_vm.vm.spec import ShareSpec
from nomad_vm.vm.vmm_user import VMMUser, resolve_vmm_user


@dataclass(frozen=True)
class TaskFiles:
    """The job's files, opened once and checked (see the module docstring)."""

    holder: FileHolder
    image: HeldFile | None = None
    kernel: HeldFile | None = None
    initramfs: HeldFile | None = None
    # The source image of each of ``VMTaskConfig.disks`` (None: an empty disk); the first is
    # ``image``.
    disk_images: tuple[HeldFile | None, ...] = ()

    def close(self) -> None:
        self.holder.close()


@dataclass(frozen=True)
class StartPlan:
    task: TaskConfig
    vm: VMTaskConfig
    # The backend's validated plan: accelerator, share transport, its own details.
    vm_plan: VMPlan
    allowed_dirs: Allowlist
    # The cloud-init seed's documents (rendered, so bad user_data fails before anything exists).
    seed: SeedDocuments | None
    # The hypervisor the task asked for (or the plugin's default).
    backend: Hypervisor
    network: NetworkPlan | MacvtapPlan | None = None
    files: TaskFiles = field(default_factory=lambda: TaskFiles(FileHolder()))
    # The task's `seed_files` (name in the ISO, content), read at planning.
    seed_files: tuple[tuple[str, bytes], ...] = ()
    # Where the task's TPM keeps its state (the task's own directory: it outlives a restart
    # in the same allocation); None without a TPM.
    tpm_state_dir: Path | None = None
    # Who owns it (vm_user; None: the plugin's own user).
    tpm_owner: VMMUser | None = None
    # The task's cgroup and its limits; None: no cgroup (plugin's `cgroups = false`, or none here).
    cgroup: CgroupPlan | None = None
    # A snapshot of the task to resume instead of booting (``snapshots``); None: boot.
    restore: Restore | None = None

    @property
    def runtime_dir(self) -> Path:
        return self.vm_plan.runtime_dir


async def plan_start(
    task: TaskConfig,
    plugin: PluginConfig,
    agent: AgentInfo,
    runtime_dir: Path,
    backends: HypervisorRegistry,
) -> StartPlan:
    """Everything StartTask needs to know, checked before anything is created."""
    vm = parse_task_config(task, plugin)
    backend = choose_backend(backends, vm, plugin)
    settings = host_settings(plugin, backend.name)
    caps = backend.capabilities
    kernel, initramfs = vm.kernel, vm.initramfs
    boots_image = bool(vm.disks) and vm.disks[0].has_image
    firmware_boots_disk = boots_image and vm.firmware in caps.disk_boot_firmware
    if kernel is None and settings.default_kernel is not None and not firmware_boots_disk:
        # The operator's kernel for tasks that name none (their initramfs needs their kernel),
        # unless the task's firmware boots its disk (CH: firmware = "uefi").
        kernel, initramfs = settings.default_kernel, settings.default_initramfs
    request = VMRequest(
        name=vm.hostname,
        vcpus=vcpus_for(task.resources, agent),
        memory_mb=memory_mb_for(task.resources),
        memory_max_mb=memory_max_mb_for(task.resources),
        arch=vm.arch,
        machine=vm.profile.machine_on(caps.machine_types),
        firmware=vm.firmware,
        kernel=kernel,
        initramfs=initramfs,
        cmdline=vm.cmdline,
        has_disk=bool(vm.disks),
        shares=task_shares(task, vm),
        display=vm.display,
        free_page_reporting=vm.free_page_reporting,
        hugepages=vm.hugepages,
        # Reserved cores (`resources { cores }`) are the vCPUs' own: one vCPU on each.
        pin_cpus=expand_cpuset(task.resources.cpuset_cpus),
        tpm=vm.profile.tpm,
        hyperv=vm.profile.hyperv,
        rtc_localtime=vm.profile.rtc_localtime,
        seed_cdrom=vm.profile.seed_cdrom and vm.gets_seed_iso,
        nic_model=vm.profile.nic_model,
    )
    check_request(backend.name, caps, request)
    if vm.profile.seed_cdrom and vm.gets_seed_iso:
        check_seed_port(vm)
    refuse_disk_options(backend.name, backend.capabilities, vm)
    await asyncio.to_thread(refuse_unusable_ceph, vm, plugin.qemu_binary)
    if not caps.guest_agent:
        refuse_agent_options(vm, f"the {backend.name} hypervisor gives its guests none")
    elif caps.guest_agent_vsock is not None and not vm.gets_seed:
        refuse_agent_options(
            vm,
            f"a {backend.name} guest's agent listens on vsock only as the cloud-init seed "
            "sets it up, and this VM gets no seed (it boots a kernel, or cloud-init is off)",
        )
    try:
        check_settings(backend.name, caps, settings)
        vm_plan = await backend.plan(request, settings, runtime_dir)
    except VMRequestError as exc:
        raise config_error(exc, settings) from None
    check_snapshot_option(vm, backend.name, caps, vm_plan)
    allowed = task_allowlist(task, plugin)
    seed = render_seed(
        task, vm, vm_plan.shares, vm_plan.share_transport.name, caps.guest_agent_vsock
    )
    seed_files = read_seed_files(vm.seed_files, allowed)
    network = await plan_nic(task, vm, plugin, backend)
    files = open_task_files(vm, allowed)
    try:
        if vm.profile.tpm:
            refuse_pvh_kernel_with_tpm(files.kernel)
    except BaseException:
        files.close()
        raise
    # Last: from here on the plan holds descriptors its caller must close.
    return StartPlan(
        task=task,
        vm=vm,
        vm_plan=vm_plan,
        allowed_dirs=allowed,
        seed=seed,
        backend=backend,
        network=network,
        seed_files=seed_files,
        tpm_state_dir=Path(task.task_dir) / TPM_STATE_DIR if vm.profile.tpm else None,
        tpm_owner=resolve_vmm_user(settings.vm_user) if vm.profile.tpm else None,
        files=files,
        cgroup=plan_cgroup(task, plugin, tcg=vm_plan.accelerator.name == "tcg"),
    )


def refuse_unusable_ceph(vm: VMTaskConfig, qemu_binary: str) -> None:
    """A disk in a Ceph pool on a node that cannot serve one is refused before anything is
    made, naming the disk's pool and the reason (the fingerprint says the same)."""
    ceph = next((d for d in vm.disks if d.ceph is not None), None)
    if ceph is None or ceph.ceph is None:
        return
    problem = ceph_problem(qemu_binary)
    if problem is not None:
        raise ConfigError(
            f"{ceph.field}.pool", f"Ceph pool {ceph.ceph.label!r} cannot be used here: {problem}"
        )


def refuse_pvh_kernel_with_tpm(kernel: HeldFile | None) -> None:
    """An ELF kernel boots through QEMU's PVH entry; measured with QEMU 7.2 (Debian 12), the
    guest then finds its ACPI tables corrupt whenever a TPM device is present (no ACPI at all:
    no power button, no TPM). A bzImage (SeaBIOS or OVMF loads it) or a disk boot is fine."""
    if kernel is None:
        return
    try:
        magic = os.pread(kernel.fd, 4, 0)
    except OSError as exc:
        raise ConfigError("config.kernel", f"cannot read {kernel.path}: {exc}") from exc
    if magic == b"\x7fELF":
        raise ConfigError(
            "config.tpm",
            f"{kernel.path} is an ELF vmlinux, which QEMU boots through its PVH entry, and "
            "with a TPM that gives the guest broken ACPI tables (no TPM, no power button); "
            "boot a bzImage (vmlinuz) or from the disk, or set tpm = false",
        )


def check_seed_port(vm: VMTaskConfig) -> None:
    """A seed on SATA takes one of the AHCI controller's six ports after the disks'."""
    sata = [disk for disk in vm.disks if disk.bus == "sata"]
    if len(sata) >= 6:
        raise ConfigError(
            f"{sata[5].field}.bus_type",
            "the seed ISO of a Windows os.variant is a SATA CD-ROM and needs one of the six "
            "SATA ports: put a disk on virtio or scsi",
        )


def refuse_disk_options(backend: str, caps: HypervisorCapabilities, vm: VMTaskConfig) -> None:
    """A backend without ``disk_blocks`` takes one plain disk: several disks, other buses,
    cdroms, serials, read-only disks and cache modes would be ignored there."""
    if caps.disk_blocks or not vm.disks:
        return
    if len(vm.disks) > 1:
        raise ConfigError(
            f"{vm.disks[1].field}", f"the {backend} hypervisor takes one disk; use qemu for more"
        )
    only, default = vm.disks[0], DiskRequest("")
    options = (
        ("bus_type", "bus"),
        ("kind", "kind"),
        ("devname", "serial"),
        ("read_only", "read_only"),
        ("driver", "cache"),
    )
    if only.nomad_volume:
        raise ConfigError(
            f"{only.field}.volume",
            f"disks backed by Nomad volumes are served to qemu only, not {backend}",
        )
    if only.pool_dir is not None or only.ceph is not None:
        raise ConfigError(
            f"{only.field}.pool", f"storage pools are served to qemu only, not {backend}"
        )
    for key, attr in options:
        if getattr(only, attr) != getattr(default, attr):
            raise ConfigError(
                f"{only.field}.{key}", f"not supported by the {backend} hypervisor; use qemu"
            )


async def plan_nic(
    task: TaskConfig, vm: VMTaskConfig, plugin: PluginConfig, backend: Hypervisor
) -> NetworkPlan | MacvtapPlan | None:
    """The task's NIC; a macvtap's device is looked at here (nothing changes on the host), so
    a missing or busy one fails the start before anything exists."""
    if not isinstance(vm.nic, MacvtapRequest):
        return plan_network(
            task.id, vm.nic, plugin.network, task.ports, task.netns_path, vm.hostname
        )
    if not backend.capabilities.macvtap:
        raise ConfigError(
            MACVTAP_FIELD,
            f"the {backend.name} hypervisor cannot take a macvtap; use network_interface.bridge",
        )
    allowed = plugin.macvtap_devices
    if allowed and vm.nic.device not in allowed:
        raise ConfigError(
            f"{MACVTAP_FIELD}.device",
            f"{vm.nic.device!r} is not one of the interfaces this node lets jobs stack a macvtap "
            f"on (the plugin's macvtap_devices: {', '.join(allowed)})",
        )
    prefix = plugin.network.tap_prefix if plugin.network is not None else DEFAULT_TAP_PREFIX
    planned = plan_macvtap(task.id, vm.nic, task.ports, task.netns_path, vm.hostname, prefix)
    await asyncio.to_thread(check_lower_device, vm.nic.device, vm.nic.mode, FIELDS)
    return planned


def refuse_agent_options(vm: VMTaskConfig, why_no_agent: str) -> None:
    """Signals other than SIGTERM/SIGINT reach the guest through its agent: a task that names
    where they go on a VM without one would find out only when it is signalled."""
    for option, value in (("signal_unit", vm.signal_unit), ("signal_pidfile", vm.signal_pidfile)):
        if value:
            raise ConfigError(
                f"config.{option}",
                f"signals reach the guest through its agent, and {why_no_agent}; remove it "
                "(SIGTERM and SIGINT still shut the VM down)",
            )


def choose_backend(
    backends: HypervisorRegistry, vm: VMTaskConfig, plugin: PluginConfig
) -> Hypervisor:
    """The task's `hypervisor`, else the plugin's, else the registry's default."""
    name = vm.hypervisor or plugin.hypervisor
    if name is None:
        return backends.default()
    if name not in backends.names:
        field = "config.hypervisor" if vm.hypervisor else "hypervisor"
        known = ", ".join(backends.names)
        raise ConfigError(field, f"this plugin has no hypervisor {name!r} (it has {known})")
    return backends.get(name)


def open_task_files(vm: VMTaskConfig, allowed: Allowlist) -> TaskFiles:
    """Open the image, kernel and initramfs ``vm`` names, each checked on its descriptor
    (ImageError naming the option if one is not allowed); nothing stays open on failure."""
    holder = FileHolder()
    try:
        opened = {
            name: open_allowed(
                f"config.{name}",
                path,
                allowed,
                holder,
                subject=str(path),
                advice="add its directory to the plugin's image_paths",
            )
            for name, path in (
                ("kernel", vm.kernel),
                ("initramfs", vm.initramfs),
            )
            if path is not None
        }
        images = tuple(
            None
            if disk.image is None
            else open_allowed(
                disk.image_field,
                disk.image,
                allowed,
                holder,
                subject=str(disk.image),
                advice="add its directory to the plugin's image_paths",
            )
            for disk in vm.disks
        )
    except BaseException:
        holder.close()
        raise
    image = images[0] if images else None
    return TaskFiles(holder, image, opened.get("kernel"), opened.get("initramfs"), images)


def render_seed(
    task: TaskConfig,
    vm: VMTaskConfig,
    shares: tuple[ShareSpec, ...] = (),
    transport: str = "9p",
    agent_vsock: tuple[int, int] | None = None,
) -> SeedDocuments | None:
    """The NoCloud documents for a disk-booting VM, unless the task turned cloud-init off.
    ``agent_vsock`` (guest CID, port): the backend reaches the guest agent over vsock, so the
    guest is told to run it there."""
    if not vm.gets_seed:
        return None
    request = CloudInitRequest(
        # A fresh instance id per start makes cloud-init treat each start as a first boot.
        instance_id=f"nomad-{task.id}",
        hostname=vm.hostname,
        timezone=vm.timezone,
        password=vm.password,
        ssh_authorized_key=vm.ssh_key,
        cmds=vm.cmds,
        env=task.env,
        user_data_text=vm.user_data,
        mounts=tuple(GuestMount(s.tag, s.guest_path, s.readonly, transport) for s in shares),
        agent_vsock=AgentVsock(*agent_vsock) if agent_vsock is not None else None,
        # Linux guests only: cloudbase-init has no bootcmd, and Windows' virtio-mem driver
        # hands what it plugs to Windows itself.
        online_hotplug_memory=memory_max_mb_for(task.resources) is not None
        and not vm.profile.windows,
        name_servers=tuple(str(d) for d in vm.nic.dns) if vm.nic is not None else (),
    )
    return render(request)
