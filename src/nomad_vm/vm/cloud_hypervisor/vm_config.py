"""The VMM's command line and the VM definition sent with ``vm.create``: pure functions of
the plan and the devices the driver prepared, so every spec can be checked against the model
without a VMM.

What the QEMU backend gives a guest, in CH's terms: vCPUs and memory from the task's resources
(memory shared with the VMM's helpers when virtio-fs is used: virtiofsd maps guest RAM); the
payload (a kernel with initramfs and command line, or the firmware that boots the disk); the
task disk (a qcow2 overlay names its backing file, which CH only follows when told) and the
cloud-init seed, read-only; TAP devices by name; one virtio-fs device per share, each on its
own virtiofsd's socket; the serial port on the VMM's stdout, which is the task's stdout; a
balloon (with the task's ``free_page_reporting``: memory the guest frees goes back to the
host, as on QEMU), pvpanic (so a
panic is an event), an RNG, and a vsock device for qemu-guest-agent (CH has no virtio-serial:
the guest's agent listens on vsock port AGENT_PORT, set up by the cloud-init seed, and the
plugin reaches it through CH's hybrid-vsock socket). No virtio-console: the guest's console is
the serial port, as on QEMU (`console=ttyS0`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nomad_vm.vm.cloud_hypervisor.files import VSOCK_SOCKET
from nomad_vm.vm.cloud_hypervisor.model import (
    BalloonConfig,
    ConsoleConfig,
    ConsoleMode,
    CpusConfig,
    DiskConfig,
    FsConfig,
    ImageType,
    MemoryConfig,
    NetConfig,
    PayloadConfig,
    RngConfig,
    VmConfig,
    VsockConfig,
)
from nomad_vm.vm.request import BackendPlan, LaunchDevices, VMPlan
from nomad_vm.vm.vmm_user import VMMUser

MIB = 1024 * 1024
# The guest's vsock context id, and the port its qemu-guest-agent listens on (the seed starts
# it so: cloudinit's AgentVsock). The CID is local to CH's own vsock device.
GUEST_CID = 3
AGENT_PORT = 7070
RNG_SOURCE = "/dev/urandom"
IMAGE_TYPES = {"qcow2": ImageType.QCOW2, "raw": ImageType.RAW}


@dataclass(frozen=True)
class CloudHypervisorPlan(BackendPlan):
    binary: str
    # The firmware that boots the disk (a VM without a kernel), else None.
    firmware: Path | None
    seccomp: str
    # The operator's log_file (appended to by every VM), or None: one in the runtime dir.
    log_file: Path | None
    # Who CH and its virtiofsd run as (None: as the plugin).
    user: VMMUser | None = None


def vmm_argv(details: CloudHypervisorPlan, api_fd: int, events_fd: int) -> list[str]:
    """The VMM only: the VM itself comes over the API. Its API socket and event file are
    descriptors the plugin made (``vmm_files``). ``--no-shutdown`` keeps CH (and so the
    verdict) after the guest powers off, until the plugin has read it."""
    return [
        details.binary,
        "--api-socket",
        f"fd={api_fd}",
        "--event-monitor",
        f"fd={events_fd}",
        "--seccomp",
        details.seccomp,
        "--no-shutdown",
    ]


def build_vm_config(plan: VMPlan, firmware: str | None, devices: LaunchDevices) -> VmConfig:
    """``firmware``: how CH names the file that boots the disk when the request has no
    kernel. Files are named ``/proc/self/fd/N`` of the descriptors CH inherits, sockets
    relative to its working directory (see ``vmm_files``)."""
    request = plan.request
    shares = plan.shares
    return VmConfig(
        payload=_payload(plan, firmware, devices),
        cpus=CpusConfig(boot_vcpus=request.vcpus, max_vcpus=request.vcpus),
        memory=MemoryConfig(size=request.memory_mb * MIB, shared=bool(shares)),
        disks=_disks(devices) or None,
        net=tuple(
            NetConfig(tap=nic.tap, mac=nic.mac, id=f"net{i}") for i, nic in enumerate(devices.nics)
        )
        or None,
        fs=tuple(
            FsConfig(tag=share.tag, socket=_socket(share.socket, share.tag), id=f"fs{i}")
            for i, share in enumerate(shares)
        )
        or None,
        serial=ConsoleConfig(mode=ConsoleMode.TTY),
        console=ConsoleConfig(mode=ConsoleMode.OFF),
        rng=RngConfig(src=RNG_SOURCE),
        balloon=BalloonConfig(
            size=0, deflate_on_oom=True, free_page_reporting=request.free_page_reporting
        ),
        # Bound by CH in its working directory (vmm_files), which is vm_user's.
        vsock=VsockConfig(cid=GUEST_CID, socket=VSOCK_SOCKET, id="vsock0"),
        pvpanic=True,
    )


def _payload(plan: VMPlan, firmware: str | None, devices: LaunchDevices) -> PayloadConfig:
    request = plan.request
    if request.kernel is not None:
        if devices.kernel is None:
            raise ValueError("a VM that boots a kernel needs the kernel's descriptor")
        initramfs = devices.initramfs.proc_path if devices.initramfs is not None else None
        return PayloadConfig(
            kernel=devices.kernel.proc_path,
            initramfs=initramfs,
            cmdline=request.cmdline or None,
        )
    if firmware is None:
        raise ValueError("a VM without a kernel needs the firmware that boots its disk")
    return PayloadConfig(firmware=firmware)


def _disks(devices: LaunchDevices) -> tuple[DiskConfig, ...]:
    disks = []
    if devices.disk is not None:
        kind = IMAGE_TYPES.get(devices.disk.format)
        if kind is None:
            raise ValueError(f"Cloud Hypervisor cannot boot a {devices.disk.format} disk")
        disks.append(
            DiskConfig(
                path=devices.disk.held.proc_path,
                image_type=kind,
                backing_files=kind is ImageType.QCOW2,
                id="disk0",
            )
        )
    if devices.seed is not None:
        disks.append(
            DiskConfig(
                path=devices.seed.proc_path, readonly=True, image_type=ImageType.RAW, id="seed"
            )
        )
    return tuple(disks)


def _socket(socket: Path | None, tag: str) -> str:
    """The socket's name in CH's working directory, where the plugin bound it."""
    if socket is None:
        raise ValueError(f"share {tag} has no virtiofsd socket")
    return socket.name
