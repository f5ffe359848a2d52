"""StartTask's host changes, in order, each recorded in the task's journal before it is made:
runtime directory, images given by URL (a lease on each, then the node's cache), disk,
network, seed, the task's cgroup, then the backend's launch (its own files, helper
processes and the VMM). Nothing here undoes anything: on any failure the caller replays the
journal (``replay``), the same path DestroyTask takes, so there is one clean-up to get right.

Every file the VMM uses goes to the backend as a descriptor in the plan's ``FileHolder`` (the
job's files opened by ``startup``, the backing chain, the task's disk and seed opened here);
the caller closes them all after the launch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

from nomad_vm.cloudinit import with_network_config, write_seed
from nomad_vm.driver.console_entry import register_console
from nomad_vm.driver.disk_steps import disk_files, prepare_disks
from nomad_vm.driver.events import EventBus
from nomad_vm.driver.image_fetch import ImageFetcher
from nomad_vm.driver.image_steps import fetch_url_images
from nomad_vm.driver.macvtap_plan import (
    MacvtapAttachment,
    MacvtapPlan,
    macvtap_event,
    macvtap_network_config,
)
from nomad_vm.driver.network_plan import (
    NetworkAttachment,
    NetworkPlan,
    network_config,
    network_event,
)
from nomad_vm.driver.networking import NetworkManager, record_of
from nomad_vm.driver.output import open_task_output
from nomad_vm.driver.recorder import TaskRecorder
from nomad_vm.driver.snapshot_store import STATE_FILE, open_file, put_back
from nomad_vm.driver.startup import StartPlan
from nomad_vm.driver.tpm_state import open_tpm_state
from nomad_vm.storage.held import HeldFile, open_own, readable_copy
from nomad_vm.vm.firmware import VARS_FILE
from nomad_vm.vm.hypervisor import Hypervisor, RunningVM
from nomad_vm.vm.request import LaunchDevices
from nomad_vm.vm.spec import NicSpec

SEED_NAME = "cidata.iso"
# SIGKILL ends a VMM at once; one still there after this is left to the journal replay.
REAP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Started:
    vm: RunningVM
    network: NetworkAttachment | MacvtapAttachment | None


async def run_start_steps(
    plan: StartPlan,
    backend: Hypervisor,
    recorder: TaskRecorder,
    networks: NetworkManager,
    events: EventBus,
    images: ImageFetcher,
    data_dir: Path | None = None,
) -> Started:
    planned = (
        *disk_files(plan),
        *([plan.runtime_dir / SEED_NAME] if plan.seed is not None or plan.seed_files else []),
    )
    await recorder.runtime_dir(plan.runtime_dir, planned)
    plan.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=False)
    if any(d.url is not None for d in plan.vm.disks):
        plan = replace(plan, files=await fetch_url_images(plan, recorder, events, images))
    disks = await prepare_disks(plan, recorder, events)
    network = None
    if plan.network is not None:
        await recorder.network(record_of(plan.network))
        network = await networks.setup(plan.network, recorder.record_network)
        events.emit(plan.task, attachment_event(network, plan.network, plan.seed is not None))
    seed = await write_seed_iso(plan, recorder, events, network)
    if data_dir is not None and plan.vm_plan.display_socket is not None:
        await register_console(plan, recorder, data_dir)
    holder = plan.files.holder
    seed_file = open_own(seed, holder, writable=False) if seed is not None else None
    kernel, initramfs = await asyncio.to_thread(boot_files, plan)
    restore_fd = await asyncio.to_thread(restored_files, plan)
    tpm_fd = await tpm_state(plan, recorder)
    if plan.cgroup is not None:
        # Before the launch: its helpers and the VMM join it at their gates.
        await recorder.make_cgroup(plan.cgroup.cgroup, plan.cgroup.limits)
    tap_fd = await networks.open_tap(network.record) if network is not None else None
    try:
        model = plan.vm.profile.nic_model
        nics = (
            ()
            if network is None
            else (NicSpec(network.record.tap, network.record.guest_mac, tap_fd, model),)
        )
        console_fd = await open_task_output(plan.task.stdout_path)
        try:
            devices = LaunchDevices(
                console_fd=console_fd,
                disk=disks.primary,
                extra_disks=disks.others,
                seed=seed_file,
                nics=nics,
                kernel=kernel,
                initramfs=initramfs,
                tpm_state_fd=tpm_fd,
                restore_fd=restore_fd,
            )
            vm = await backend.launch(plan.vm_plan, devices, recorder)
        finally:
            # The VMM holds its own copies of the FIFO and the TAP descriptor; ours must not
            # keep logmon's pipe (or the TAP) open.
            os.close(console_fd)
    finally:
        for fd in (tap_fd, tpm_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
    try:
        await recorder.started()
    except BaseException:
        # The VMM is our child: end and reap it here (the journal replay that follows finds
        # it gone), then drop our connection.
        vm.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(vm.wait(), REAP_TIMEOUT)
        await vm.close()
        raise
    return Started(vm, network)


def restored_files(plan: StartPlan) -> int | None:
    """A resume: the snapshot's UEFI variable store into the runtime directory (the backend
    keeps a store it finds there), and the saved state opened for the VMM. None: a boot."""
    if plan.restore is None:
        return None
    put_back(plan.restore, plan.runtime_dir, VARS_FILE)
    # Held with the start's other files: closed once the VMM has its copy.
    fd = open_file(plan.restore.dir_fd, STATE_FILE)
    plan.files.holder.add(HeldFile(Path(plan.task.task_dir) / "snapshot" / STATE_FILE, fd))
    return fd


async def tpm_state(plan: StartPlan, recorder: TaskRecorder) -> int | None:
    """The TPM's state directory, on record as something the task keeps (the replay leaves
    it: it outlives restarts in the allocation), then made and opened for swtpm."""
    if plan.tpm_state_dir is None:
        return None
    recorder.volume(plan.tpm_state_dir)
    return await asyncio.to_thread(open_tpm_state, plan.tpm_state_dir, plan.tpm_owner)


def attachment_event(
    network: NetworkAttachment | MacvtapAttachment,
    plan: NetworkPlan | MacvtapPlan,
    has_seed: bool,
) -> str:
    """The "Network: ..." task event of either kind of NIC."""
    if isinstance(network, MacvtapAttachment):
        return macvtap_event(network)
    if not isinstance(plan, NetworkPlan):
        raise TypeError("a bridge attachment comes from a bridge plan")
    return network_event(network, plan, has_seed)


def boot_files(plan: StartPlan) -> tuple[HeldFile | None, HeldFile | None]:
    """The kernel and initramfs for the VMM: the descriptors checked at planning, or sealed
    copies of those the VMM could not reopen itself (``held.readable_copy``)."""
    files = plan.files
    kernel = None if files.kernel is None else readable_copy(files.kernel, files.holder)
    initramfs = None if files.initramfs is None else readable_copy(files.initramfs, files.holder)
    return kernel, initramfs


async def write_seed_iso(
    plan: StartPlan,
    recorder: TaskRecorder,
    events: EventBus,
    network: NetworkAttachment | MacvtapAttachment | None = None,
) -> Path | None:
    """The seed as planned, with the guest's address once the network has one."""
    seed = plan.seed
    if seed is None and not plan.seed_files:
        return None
    if seed is not None and network is not None:
        config = (
            macvtap_network_config(network)
            if isinstance(network, MacvtapAttachment)
            else network_config(network)
        )
        seed = with_network_config(seed, config)
    await recorder.creating("seed", plan.runtime_dir / SEED_NAME)
    path = write_seed(seed, plan.runtime_dir / SEED_NAME, plan.seed_files)
    for warning in seed.warnings if seed is not None else ():
        events.emit(plan.task, f"cloud-init: {warning}")
    return path
