"""One VM as asked, as planned, and as handed to its launch: the hypervisor-neutral
``VMRequest``, the ``VMPlan`` a backend makes of it (with the backend's own ``BackendPlan``), and
the ``LaunchDevices`` the driver prepared.

Part of the hypervisor interface (``nomad_vm.vm.hypervisor``); nothing here knows Nomad.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nomad_vm.storage.held import HeldFile
from nomad_vm.vm.accel import AcceleratorChoice
from nomad_vm.vm.share_transport import ShareTransport
from nomad_vm.vm.spec import DiskSpec, NicSpec, ShareSpec


@dataclass(frozen=True)
class VMRequest:
    """One VM as the driver wants it, before any backend has looked at it."""

    name: str
    vcpus: int
    memory_mb: int
    arch: str
    machine: str
    firmware: str
    kernel: Path | None
    initramfs: Path | None
    cmdline: str
    # The VM boots (or has its root filesystem on) a disk the driver prepares.
    has_disk: bool
    shares: tuple[ShareSpec, ...] = ()
    # A graphical console's adapter, or "none" (schema: task `display`).
    display: str = "none"
    # The guest reports the memory it freed, which the host takes back (task
    # `free_page_reporting`).
    free_page_reporting: bool = False
    # Guest RAM on the host's huge pages (task `hugepages`).
    hugepages: bool = False
    # The task's reserved cores (Nomad's cpuset), one per vCPU: vCPU i is pinned to
    # ``pin_cpus[i]``. Empty: no pinning.
    pin_cpus: tuple[int, ...] = ()
    # A TPM 2.0 whose state lives in ``LaunchDevices.tpm_state_fd``; Hyper-V enlightenments
    # (those the accelerator can give); the RTC in local time; the seed as a CD-ROM on SATA.
    tpm: bool = False
    hyperv: bool = False
    rtc_localtime: bool = False
    seed_cdrom: bool = False
    # The model of the VM's network cards (one of the capabilities' ``nic_models``).
    nic_model: str = "virtio"
    # The most memory the guest may grow to (MB, above ``memory_mb``): the difference is
    # hot-pluggable (``memory_hotplug`` backends); None: the guest's memory is fixed.
    memory_max_mb: int | None = None


@dataclass(frozen=True)
class BackendPlan:
    """Base of a backend's own part of a plan (its binary, machine, firmware files ...)."""


@dataclass(frozen=True)
class VMPlan:
    """A validated request: what the driver needs to know (accelerator, how shares travel, the
    shares as the guest will see them) plus the backend's own part, which only it reads."""

    backend: str
    request: VMRequest
    runtime_dir: Path
    accelerator: AcceleratorChoice
    share_transport: ShareTransport
    shares: tuple[ShareSpec, ...]
    details: BackendPlan
    # Where the VM's VNC server will listen (a unix socket in runtime_dir), when it has a
    # display: the driver writes it into the console registry (``driver.console_entry``).
    display_socket: Path | None = None
    # What the backend changed from the request and the task should be told (task events),
    # e.g. Hyper-V enlightenments dropped under TCG.
    notes: tuple[str, ...] = ()
    # The VMM's version (QEMU's `--version`): a snapshot is only restored by the same one.
    vmm_version: str = ""


@dataclass(frozen=True)
class LaunchDevices:
    """What the driver prepared for the VM: its disk, cloud-init seed, NICs and console, and
    the kernel and initramfs of a direct kernel boot. Files are descriptors the driver opened
    and checked (``storage.held``); it closes them once ``launch`` has returned."""

    console_fd: int
    disk: DiskSpec | None = None
    seed: HeldFile | None = None
    nics: tuple[NicSpec, ...] = ()
    kernel: HeldFile | None = None
    initramfs: HeldFile | None = None
    # The task's other disks (`disk` blocks after the primary); only QEMU takes them.
    extra_disks: tuple[DiskSpec, ...] = ()
    # The TPM's state directory (an O_PATH descriptor, owned by the VMM's user), for a
    # request with ``tpm``.
    tpm_state_fd: int | None = None
    # A saved memory and device state to resume instead of booting (``snapshot`` backends;
    # ``RunningVM.save_state`` wrote it): the launch returns once it is loaded.
    restore_fd: int | None = None
