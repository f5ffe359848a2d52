"""What a backend can do and what the host offers it: the ``capabilities`` a backend declares
once (the driver checks a request against them, never importing a backend), the plugin config's
settings for it, and what ``check_host`` found (fingerprint facts).

Part of the hypervisor interface (``nomad_vm.vm.hypervisor``); nothing here knows Nomad.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import NomadVMError
from nomad_vm.vm.accel import AcceleratorChoice, KvmStatus
from nomad_vm.vm.share_transport import ShareTransport


@dataclass(frozen=True)
class HypervisorCapabilities:
    """What one backend can do. Values are the task and plugin config's own (``schema/``
    declares every allowed value and default; each backend supports a subset)."""

    accelerators: tuple[str, ...]
    firmware_kinds: tuple[str, ...]
    # The firmware kinds that boot a disk when the VM has no kernel (Cloud Hypervisor has no
    # BIOS: "bios" there only means a kernel booted directly).
    disk_boot_firmware: tuple[str, ...]
    # The first is the default, for tasks that name none.
    machine_types: tuple[str, ...]
    arches: tuple[str, ...]
    share_transports: tuple[str, ...]
    # The guest gets a qemu-guest-agent channel: exec, signals to its units, terminal sessions.
    guest_agent: bool
    # A port for an interactive session can be added to a running VM (`nomad alloc exec -t`).
    terminal_hotplug: bool
    # The vCPUs can be stopped and started again in place (``RunningVM.pause`` / ``resume``):
    # `nomad alloc signal -s SIGSTOP / SIGCONT`.
    pause: bool
    snapshot: bool
    # A guest power-off or panic that happens while no plugin runs is still known afterwards
    # (QEMU keeps it in its paused run state); otherwise such an end reads as "VM gone".
    verdict_survives_plugin_absence: bool
    # A NIC can be a macvtap, handed over as the descriptor of its /dev/tapN (QEMU's
    # -netdev tap,fd=N); Cloud Hypervisor opens TAPs by name through /dev/net/tun.
    macvtap: bool = False
    # `disk {}` blocks beyond one plain virtio disk: several disks, other buses, cdroms,
    # serials, read-only disks, cache modes and storage-pool volumes.
    disk_blocks: bool = False
    # The guest's serial console can be attached to read-write (``RunningVM.console_socket``)
    # while its output keeps going to the task's stdout.
    serial_console: bool = False
    # The task's `display` values it offers: "none" only, or graphical consoles whose VNC
    # server listens on a unix socket in the runtime directory (VMPlan.display_socket).
    displays: tuple[str, ...] = ("none",)
    # (guest CID, port): the guest's agent is reached over vsock, not a virtio-serial port,
    # so the guest must be told to run it there (the cloud-init seed does); None: serial.
    guest_agent_vsock: tuple[int, int] | None = None
    # Free page reporting on the balloon (the task's `free_page_reporting`).
    free_page_reporting: bool = False
    # Guest RAM on the host's huge pages (the task's `hugepages`).
    hugepages: bool = False
    # A TPM 2.0 (one swtpm per VM), Hyper-V enlightenments, an RTC in local time, and the NIC
    # models a guest may get (the first is the default): what Windows guests need.
    tpm: bool = False
    hyperv: bool = False
    rtc_localtime: bool = False
    nic_models: tuple[str, ...] = ("virtio",)
    # Guest memory can grow and shrink while the VM runs, up to VMRequest.memory_max_mb
    # (``RunningVM.hotplug_memory`` / ``resize_hotplug_memory``; QEMU: virtio-mem).
    memory_hotplug: bool = False


@dataclass(frozen=True)
class HostSettings:
    """The plugin config's hypervisor settings, in neutral terms."""

    binary: str
    accelerator: str
    share_transport: str
    virtiofsd_binary: str
    # The account the VMM and its helpers run as (``nomad_vm.vm.vmm_user``), and whether the
    # VMM filters its own system calls (a backend that cannot says so in check_host).
    vm_user: str
    seccomp: bool
    # A kernel (and initramfs) for requests that name none; None: such VMs boot their disk.
    default_kernel: Path | None = None
    default_initramfs: Path | None = None
    # A firmware file that boots disks, for backends that do not find their own.
    firmware_file: Path | None = None
    # The VMM's own seccomp mode, in its terms (Cloud Hypervisor: true, false or log).
    seccomp_mode: str = "true"
    # Where the VMM's own messages go (appended); None: a log in the VM's runtime directory.
    log_file: Path | None = None
    # Use KVM without probing it first (the operator vouches for it).
    trust_kvm: bool = False
    # Guest RAM marked mergeable for KSM (the plugin's `ksm { enabled }`); False: the VMM's
    # default.
    mem_merge: bool = False
    # Setting -> the config field it came from, for errors that name what the user wrote.
    fields: tuple[tuple[str, str], ...] = ()

    def field_of(self, option: str) -> str | None:
        return dict(self.fields).get(option)


@dataclass(frozen=True)
class HostFacts:
    """What ``check_host`` found: fingerprint facts. ``problem`` (None when the host can run
    VMs) says why not: a VMRequestError names the setting at fault. ``attributes`` are backend
    facts such as its version, named without the ``driver.vm.`` prefix (``qemu.version``)."""

    kvm: KvmStatus
    problem: NomadVMError | None = None
    accelerator: AcceleratorChoice | None = None
    share_transport: ShareTransport | None = None
    attributes: tuple[tuple[str, str], ...] = ()
