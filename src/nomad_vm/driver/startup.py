"""StartTask as steps: plan (no side effects), then disk, then launch, each undone on failure.

``plan_start`` validates everything that can be checked without touching the host, so a bad
job fails before any file or process exists. The steps after it register their undo on the
caller's ExitStack.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.cloudinit import (
    CloudInitRequest,
    GuestMount,
    SeedDocuments,
    render,
    with_network_config,
    write_seed,
)
from nomad_vm.driver.config import (
    PluginConfig,
    VMTaskConfig,
    parse_task_config,
    task_allowlist,
)
from nomad_vm.driver.events import EventBus
from nomad_vm.driver.network_plan import (
    NetworkAttachment,
    NetworkPlan,
    network_config,
    plan_network,
)
from nomad_vm.driver.resources import memory_mb_for, vcpus_for
from nomad_vm.driver.shares import task_shares, with_sockets
from nomad_vm.driver.types import AgentInfo, TaskConfig
from nomad_vm.storage.disk import prepare_boot_disk
from nomad_vm.storage.paths import Allowlist
from nomad_vm.vm.accel import AcceleratorChoice, choose_accelerator, probe_kvm
from nomad_vm.vm.firmware import FirmwarePlan, plan_firmware, prepare_vars
from nomad_vm.vm.machine import MachineConfig, validate_machine
from nomad_vm.vm.qemu.binary import find_qemu, find_qemu_img
from nomad_vm.vm.share_transport import ShareTransport, choose_share_transport
from nomad_vm.vm.spec import DiskSpec, NicSpec, ShareSpec, VMSpec

SEED_NAME = "cidata.iso"
AGENT_SOCKET = "agent.sock"


@dataclass(frozen=True)
class StartPlan:
    task: TaskConfig
    vm: VMTaskConfig
    accel: AcceleratorChoice
    qemu: str
    vcpus: int
    memory_mb: int
    runtime_dir: Path
    allowed_dirs: Allowlist
    machine: MachineConfig
    firmware: FirmwarePlan | None
    # The cloud-init seed's documents (rendered, so bad user_data fails before anything exists).
    seed: SeedDocuments | None
    shares: tuple[ShareSpec, ...]
    share_transport: ShareTransport
    network: NetworkPlan | None = None


async def plan_start(
    task: TaskConfig, plugin: PluginConfig, agent: AgentInfo, runtime_dir: Path
) -> StartPlan:
    """Everything StartTask needs to know, checked before anything is created."""
    vm = parse_task_config(task, plugin)
    machine = validate_machine(
        vm.arch,
        vm.machine,
        vm.firmware,
        has_kernel=vm.kernel is not None,
        has_disk=vm.image is not None,
    )
    transport = choose_share_transport(plugin.share_transport, plugin.virtiofsd_binary)
    shares = task_shares(task, vm)
    if transport.name == "virtiofs":
        shares = with_sockets(shares, runtime_dir)
    # The KVM probe runs a child process (once per plugin process): keep it off the loop.
    kvm = await asyncio.to_thread(probe_kvm)
    return StartPlan(
        task=task,
        vm=vm,
        accel=choose_accelerator(plugin.accelerator, kvm),
        qemu=str(find_qemu(plugin.qemu_binary)),
        vcpus=vcpus_for(task.resources, agent),
        memory_mb=memory_mb_for(task.resources),
        runtime_dir=runtime_dir,
        allowed_dirs=task_allowlist(task, plugin),
        machine=machine,
        firmware=plan_firmware(vm.firmware),
        seed=render_seed(task, vm, shares, transport.name),
        shares=shares,
        share_transport=transport,
        network=plan_network(
            task.id, vm.nic, plugin.network, task.ports, task.netns_path, vm.hostname
        ),
    )


def render_seed(
    task: TaskConfig, vm: VMTaskConfig, shares: tuple[ShareSpec, ...] = (), transport: str = "9p"
) -> SeedDocuments | None:
    """The NoCloud documents for a disk-booting VM, unless the task turned cloud-init off."""
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
    )
    return render(request)


def make_runtime_dir(plan: StartPlan, undo: contextlib.AsyncExitStack) -> None:
    plan.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=False)
    undo.callback(shutil.rmtree, plan.runtime_dir, True)


async def prepare_disk(plan: StartPlan, events: EventBus) -> DiskSpec | None:
    """The task's own disk (overlay or copy) inside the runtime dir, removed with it."""
    if plan.vm.image is None:
        return None
    qemu_img = find_qemu_img()
    disk = await asyncio.to_thread(
        prepare_boot_disk,
        qemu_img,
        plan.vm.image,
        plan.runtime_dir,
        thin=plan.vm.use_thin_copy,
        size_mb=plan.vm.disk_size_mb,
        allowed_dirs=plan.allowed_dirs,
    )
    how = "thin copy (qcow2 overlay)" if disk.thin else "full copy"
    size_mb = disk.virtual_size // (1024 * 1024)
    events.emit(
        plan.task,
        f"Disk prepared: {how} of {plan.vm.image.name}, {size_mb} MB",
        {"image": str(plan.vm.image), "source_format": disk.source_format},
    )
    return DiskSpec(disk.path, disk.format)


def write_seed_iso(
    plan: StartPlan, events: EventBus, network: NetworkAttachment | None = None
) -> Path | None:
    """The seed as planned, with the guest's address once the network has one."""
    seed = plan.seed
    if seed is None:
        return None
    if network is not None:
        seed = with_network_config(seed, network_config(network))
    path = write_seed(seed, plan.runtime_dir / SEED_NAME)
    for warning in seed.warnings:
        events.emit(plan.task, f"cloud-init: {warning}")
    return path


def prepare_firmware_vars(plan: StartPlan) -> Path | None:
    """The task's own UEFI variable store (the template is never written)."""
    if plan.firmware is None:
        return None
    return prepare_vars(plan.firmware, plan.runtime_dir)


def build_spec(
    plan: StartPlan,
    disk: DiskSpec | None,
    firmware_vars: Path | None,
    seed: Path | None,
    network: NetworkAttachment | None = None,
    tap_fd: int | None = None,
) -> VMSpec:
    nics = (
        () if network is None else (NicSpec(network.record.tap, network.record.guest_mac, tap_fd),)
    )
    return VMSpec(
        name=plan.vm.hostname,
        vcpus=plan.vcpus,
        memory_mb=plan.memory_mb,
        kernel=plan.vm.kernel,
        initramfs=plan.vm.initramfs,
        cmdline=plan.vm.cmdline,
        accelerator=plan.accel.name,
        control_socket=plan.runtime_dir / "qmp.sock",
        disk=disk,
        machine=plan.machine,
        firmware=plan.firmware,
        firmware_vars=firmware_vars,
        seed=seed,
        agent_socket=plan.runtime_dir / AGENT_SOCKET,
        shares=plan.shares,
        share_transport=plan.share_transport.name,
        nics=nics,
    )
