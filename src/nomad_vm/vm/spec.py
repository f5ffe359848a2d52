"""A hypervisor-neutral description of one VM; each backend turns it into its own command line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nomad_vm.storage.ceph_pool import CephPool
from nomad_vm.storage.held import HeldFile
from nomad_vm.vm.firmware import FirmwarePlan
from nomad_vm.vm.machine import MachineConfig

DEFAULT_MACHINE = MachineConfig(machine="pc", firmware="bios", smm=None)


@dataclass(frozen=True)
class RbdSpec:
    """An RBD image the VMM opens itself (its own librbd session to the pool's monitors).
    ``key`` is the cephx key as the descriptor the VMM reads it from: made by the backend at
    launch, for the user the VMM runs as (``storage.rbd_keys``)."""

    pool: CephPool
    image: str
    read_only: bool = False
    key: HeldFile | None = None


@dataclass(frozen=True)
class DiskSpec:
    """A disk the VM gets, already prepared (the task's own copy or overlay), opened
    read-write; ``backing`` is its backing chain (nearest first, with formats) as the
    descriptors the plugin checked. The VMM opens no file by name (``storage.held``).
    An RBD disk (``rbd``) has no file: the VMM reaches it over the network."""

    file: HeldFile | None
    format: str
    backing: tuple[tuple[HeldFile, str], ...] = ()
    # How the guest sees it (``storage.disk_device``): bus (virtio, sata, scsi, ide), kind
    # (disk, cdrom), serial ("" none: the guest's /dev/disk/by-id name), QEMU cache mode.
    # Read-only when ``file`` (or ``rbd``) is.
    bus: str = "virtio"
    kind: str = "disk"
    serial: str = ""
    cache: str = "writeback"
    # ``file`` is a host block device (a Nomad volume's), which QEMU reads through its
    # host_device driver (its file driver takes regular files only).
    block_device: bool = False
    rbd: RbdSpec | None = None

    @property
    def held(self) -> HeldFile:
        """The disk's file, for code that takes only file disks (Cloud Hypervisor: the driver
        refuses pool disks there before anything is planned)."""
        if self.file is None:
            raise ValueError("an RBD disk has no host file")
        return self.file

    @property
    def path(self) -> Path:
        return self.held.path


@dataclass(frozen=True)
class ShareSpec:
    """A host directory shared with the guest: ``tag`` is what the guest mounts."""

    tag: str
    host_path: Path
    guest_path: str
    readonly: bool
    # virtio-fs only: the vhost-user socket its virtiofsd listens on, and QEMU's end of a
    # connection to it, handed over as a descriptor (QEMU cannot reach the path).
    socket: Path | None = None
    socket_fd: int | None = None
    # ``host_path`` opened by the driver, handed to the VMM or share daemon, which reaches it
    # as /proc/self/fd/N (nomad_vm.vm.handover); None: they open the path themselves.
    host_fd: int | None = None


@dataclass(frozen=True)
class NicSpec:
    """A virtio network card on an existing TAP device (created by the driver, not QEMU)."""

    tap: str
    mac: str
    # A descriptor of the TAP, opened by the driver (the TAP is in another network namespace,
    # where QEMU could not find it by name); QEMU inherits it under the same number.
    fd: int | None = None
    # The card the guest sees: "virtio" (virtio-net) or "e1000e" (an Intel 82574L, which
    # guests without virtio drivers, such as a Windows installer, have a driver for).
    model: str = "virtio"


@dataclass(frozen=True)
class VMSpec:
    name: str
    vcpus: int
    memory_mb: int
    # Descriptors of the kernel and initramfs (storage.held), for direct kernel boot.
    kernel: HeldFile | None
    initramfs: HeldFile | None
    cmdline: str
    # "kvm" or "tcg", decided by nomad_vm.vm.accel before the spec is built.
    accelerator: str
    # Control socket of the VMM (QMP for QEMU).
    control_socket: Path
    # The boot disk (first virtio disk), or None for a kernel-only VM.
    disk: DiskSpec | None = None
    # The task's other disks, in the order of its `disk` blocks (QEMU only).
    extra_disks: tuple[DiskSpec, ...] = ()
    machine: MachineConfig = field(default=DEFAULT_MACHINE)
    # UEFI firmware, its code (read-only) and the task's own copy of its variable store
    # (writable), opened by the plugin (None for BIOS).
    firmware: FirmwarePlan | None = None
    firmware_code: HeldFile | None = None
    firmware_vars: HeldFile | None = None
    # A cloud-init NoCloud seed ISO, attached read-only.
    seed: HeldFile | None = None
    # Host side of the guest agent's virtio-serial port (qemu-guest-agent), or None.
    agent_socket: Path | None = None
    shares: tuple[ShareSpec, ...] = ()
    # How shares reach the guest: "9p" (QEMU serves them) or "virtiofs" (a virtiofsd each).
    share_transport: str = "9p"
    nics: tuple[NicSpec, ...] = ()
    # Listening descriptors of the control and agent sockets, bound by the driver at
    # ``control_socket``/``agent_socket`` (nomad_vm.vm.handed_sockets); None: the VMM binds the
    # path itself.
    control_fd: int | None = None
    agent_fd: int | None = None
    # The serial console as a socket the plugin bound at ``serial_socket`` and QEMU serves
    # (``serial_fd``, listening), with every byte the guest writes also going to
    # ``console_log_fd`` (the task's stdout FIFO) whether or not anyone is attached. None:
    # the console is QEMU's stdout, output only.
    serial_socket: Path | None = None
    serial_fd: int | None = None
    console_log_fd: int | None = None
    # The VMM filters its own system calls (QEMU's -sandbox).
    seccomp: bool = False
    # Guest RAM marked mergeable for KSM; False: the VMM's default (QEMU's is mergeable too,
    # but only a request says so on the command line, where the operator can see it).
    mem_merge: bool = False
    # The balloon's free page reporting: the guest's freed memory goes back to the host.
    free_page_reporting: bool = False
    # Guest RAM on the host's huge pages (a hugetlb memfd, allocated at start).
    hugepages: bool = False
    # Host CPUs the vCPUs are pinned to once QEMU runs (vCPU i on pin_cpus[i]); empty: none.
    pin_cpus: tuple[int, ...] = ()
    # The task's `display`: "none", or the adapter of a graphical console ("vga", "virtio"),
    # whose VNC server is served at ``display_socket`` (QEMU: ``qemu.display``).
    display: str = "none"
    display_socket: Path | None = None
    # QEMU's end of the control connection to the task's swtpm (``vm.swtpm``): a TPM 2.0.
    tpm_fd: int | None = None
    # Hyper-V enlightenments as -cpu flags (``vm.hyperv``); empty: none.
    hyperv: tuple[str, ...] = ()
    # A saved state QEMU loads instead of booting (``-incoming fd:N``, ``qemu.snapshot``).
    incoming_fd: int | None = None
    # The guest's RTC keeps local time (what Windows expects) rather than UTC.
    rtc_localtime: bool = False
    # The seed ISO as a virtio disk ("virtio") or a CD-ROM on the AHCI controller ("sata"),
    # which a guest without virtio drivers (Windows Setup looking for autounattend.xml) reads.
    seed_bus: str = "virtio"
    # The most memory the guest may grow to (MB): above ``memory_mb`` it is hot-pluggable
    # (QEMU: a virtio-mem device, ``qemu.memory_argv``); None: fixed.
    memory_max_mb: int | None = None


@dataclass(frozen=True)
class VMExit:
    """How a VM ended.

    ``code``/``signal`` describe the VMM process (``code`` is None when it died of ``signal``
    or when the driver was not its parent and could not learn it). ``guest_poweroff`` and
    ``panicked`` say what the guest itself did, as QEMU reported it.
    """

    code: int | None
    signal: int | None
    reason: str
    guest_poweroff: bool = False
    panicked: bool = False

    @property
    def clean(self) -> bool:
        return self.guest_poweroff or (self.code == 0 and not self.signal and not self.panicked)
