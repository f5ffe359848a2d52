"""VMSpec -> QEMU command line. A pure function, golden-tested (tests/unit/test_qemu_argv.py).

The files QEMU uses (disk, seed, firmware, kernel) reach it as descriptors: ``files_argv``.
"""

from __future__ import annotations

from nomad_vm.vm.handover import fd_path
from nomad_vm.vm.machine import machine_argv
from nomad_vm.vm.machine import option_value as opt
from nomad_vm.vm.qemu.agent_channel import agent_argv
from nomad_vm.vm.qemu.disk_devices import disks_argv, seed_device
from nomad_vm.vm.qemu.display import display_argv
from nomad_vm.vm.qemu.files_argv import (
    FdSets,
    boot_argv,
    firmware_argv,
    seed_argv,
)
from nomad_vm.vm.qemu.memory_argv import hotplug_memory_argv, memory_size_argv
from nomad_vm.vm.spec import VMSpec

# Without a handed serial socket (specs built without descriptors), the guest's first serial
# port is QEMU's stdout, the task's stdout FIFO: output only. signal=off keeps a Ctrl-C byte in
# the console from killing QEMU.
SERIAL_CHARDEV = "stdio,id=serial0,signal=off"
# The guest RAM's memory backend when virtio-fs needs it shared.
SHARED_RAM = "ram0"


# QEMU's own system-call filter: no obsolete calls, no setuid/setgid, no fork/exec, no
# scheduler or resource changes, even for a guest that has taken QEMU over.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def qemu_argv(binary: str, spec: VMSpec) -> list[str]:
    # One numbering of -add-fd sets for the whole command line.
    sets = FdSets()
    sandbox = ["-sandbox", SANDBOX] if spec.seccomp else []
    return [
        binary,
        *_platform(spec, sets),
        *sandbox,
        *_control(spec, sets),
        *_devices(spec, sets),
        *_boot(spec),
        *incoming_argv(spec),
    ]


def incoming_argv(spec: VMSpec) -> list[str]:
    """Resume a saved state instead of booting (``qemu.snapshot``): QEMU reads the stream
    from the inherited descriptor before any vCPU runs, then runs the VM."""
    return [] if spec.incoming_fd is None else ["-incoming", f"fd:{spec.incoming_fd}"]


def _platform(spec: VMSpec, sets: FdSets) -> list[str]:
    # virtiofsd maps the guest's RAM to serve file data: it must be shareable memory.
    shared_ram = spec.share_transport == "virtiofs" and bool(spec.shares)
    # The guest's RAM is an explicit memory backend when virtiofsd must map it or when it
    # lives on huge pages; otherwise QEMU's default (private anonymous memory).
    ram_backend = shared_ram or spec.hugepages
    argv = [
        "-name",
        f"guest={opt(spec.name)},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        *machine_argv(
            spec.machine, spec.firmware, SHARED_RAM if ram_backend else None, spec.mem_merge
        ),
        *firmware_argv(sets, spec.firmware, spec.firmware_code, spec.firmware_vars),
        "-accel",
        spec.accelerator,
    ]
    if ram_backend:
        backend = f"memory-backend-memfd,id={SHARED_RAM},size={spec.memory_mb}M"
        if shared_ram:
            backend += ",share=on"
        if spec.hugepages:
            # Huge pages of the host's default size, all taken at start (prealloc): a pool
            # that ran dry later would kill the VM with SIGBUS instead of failing its start.
            backend += ",hugetlb=on,prealloc=on"
        if spec.mem_merge:
            # Said for the record only with share=on or hugetlb: the kernel never merges a
            # shared or hugetlb mapping (driver/ksm.py), so such a guest's RAM stays unmerged.
            backend += ",merge=on"
        argv += ["-object", backend]
    if spec.accelerator == "kvm":
        argv += ["-cpu", ",".join(("host", *spec.hyperv))]
    elif spec.hyperv:
        # Not planned (vm.hyperv drops them all under TCG); kept correct if it ever is.
        argv += ["-cpu", ",".join(("qemu64", *spec.hyperv))]
    if spec.rtc_localtime:
        # Windows keeps the RTC in local time; QEMU starts it from the host's local time.
        argv += ["-rtc", "base=localtime"]
    return [
        *argv,
        "-smp",
        str(spec.vcpus),
        *memory_size_argv(spec),
        *hotplug_memory_argv(spec, shared_ram, "pci"),
    ]


def serial_argv(spec: VMSpec, sets: FdSets) -> list[str]:
    """The guest's first serial port (its console: ttyS0, COM1).

    With a handed socket, the console is read-write: QEMU serves the socket the plugin bound
    (one client at a time; the plugin connects while `nomad alloc exec` sessions are attached,
    driver/console_session.py), and ``logfile`` copies every byte the guest writes to the
    task's stdout FIFO, handed over as an fdset. QEMU writes that copy itself, attached or not
    and with or without a plugin running, so `nomad alloc logs` sees the console as before.
    """
    if spec.serial_fd is None:
        return ["-chardev", SERIAL_CHARDEV, "-serial", "chardev:serial0"]
    if spec.console_log_fd is None:
        raise ValueError("a serial socket needs the console log descriptor")
    add, log_name = sets.add_fd(spec.console_log_fd)
    chardev = (
        f"socket,id=serial0,fd={spec.serial_fd},server=on,wait=off,logfile={log_name},logappend=on"
    )
    return [*add, "-chardev", chardev, "-serial", "chardev:serial0"]


def _control(spec: VMSpec, sets: FdSets) -> list[str]:
    if spec.control_fd is not None:
        qmp = [
            "-chardev",
            f"socket,id=qmp,fd={spec.control_fd},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
        ]
    else:
        qmp = ["-qmp", f"unix:{opt(spec.control_socket)},server=on,wait=off"]
    return [
        "-display",
        "none",
        "-vga",
        "none",
        # A graphical console only when the task asks: its adapter and a VNC server that
        # the plugin points at a socket it binds (``display.serve_vnc``); never a window.
        *display_argv(spec.display),
        *serial_argv(spec, sets),
        *qmp,
        # A guest power-off or panic pauses QEMU instead of ending it, so the verdict survives
        # in QEMU's run state until the driver (possibly restarted meanwhile) has read it.
        "-action",
        "shutdown=pause,panic=pause",
    ]


def _devices(spec: VMSpec, sets: FdSets) -> list[str]:
    # microvm has no PCI bus: its virtio devices sit on virtio-mmio ("-device" suffix).
    microvm = spec.machine.machine == "microvm"
    virtio = "device" if microvm else "pci"
    argv = []
    if not microvm:
        # Lets the guest kernel tell QEMU it panicked (Linux's pvpanic driver).
        argv += ["-device", "pvpanic"]
    # Memory statistics from inside the guest (used/available), for TaskStats; with free page
    # reporting, the guest also hands back what it freed (QEMU discards those pages).
    reporting = ",free-page-reporting=on" if spec.free_page_reporting else ""
    argv += ["-device", f"virtio-balloon-{virtio},id=balloon0{reporting}"]
    # write-cache=on by default: what -drive's default cache=writeback gave the guest (a
    # device on a -blockdev node would otherwise be write-through, flushing after every write).
    argv += disks_argv(sets, spec)
    if spec.seed is not None:
        argv += [*seed_argv(sets, spec.seed), "-device", seed_device(spec, virtio)]
    if spec.tpm_fd is not None:
        argv += tpm_argv(spec.tpm_fd)
    if spec.agent_socket is not None:
        argv += agent_argv(spec.agent_socket, microvm=microvm, fd=spec.agent_fd)
    for i, nic in enumerate(spec.nics):
        # script=no: the TAP already exists on its bridge; QEMU only opens it (or uses the
        # descriptor the driver opened for it).
        source = (
            f"fd={nic.fd}" if nic.fd is not None else f"ifname={nic.tap},script=no,downscript=no"
        )
        model = f"virtio-net-{virtio}" if nic.model == "virtio" else nic.model
        argv += [
            "-netdev",
            f"tap,id=net{i},{source}",
            "-device",
            f"{model},netdev=net{i},mac={nic.mac}",
        ]
    for i, share in enumerate(spec.shares):
        if spec.share_transport == "virtiofs":
            # read-only is enforced by the share's virtiofsd (--readonly).
            fd = share.socket_fd
            where = f"fd={fd}" if fd is not None else f"path={opt(share.socket)}"
            argv += [
                "-chardev",
                f"socket,id=vfs{i},{where}",
                "-device",
                f"vhost-user-fs-{virtio},chardev=vfs{i},tag={share.tag}",
            ]
            continue
        # security_model=none: files keep the host's owners, and the guest acts on them with
        # QEMU's own rights (vm_user: no chown to root, no setuid-root files, no device
        # nodes); readonly is enforced by QEMU.
        root = fd_path(share.host_fd) if share.host_fd is not None else opt(share.host_path)
        fsdev = f"local,id=fs{i},path={root},security_model=none"
        argv += [
            "-fsdev",
            fsdev + (",readonly=on" if share.readonly else ""),
            "-device",
            f"virtio-9p-{virtio},fsdev=fs{i},mount_tag={share.tag}",
        ]
    return argv


def tpm_argv(fd: int) -> list[str]:
    """A TPM 2.0 (CRB interface, what TPM 2.0 guests expect) backed by the task's swtpm,
    whose control connection QEMU inherits as ``fd``."""
    return [
        "-chardev",
        f"socket,id=tpmchr,fd={fd}",
        "-tpmdev",
        "emulator,id=tpm0,chardev=tpmchr",
        "-device",
        "tpm-crb,tpmdev=tpm0",
    ]


def _boot(spec: VMSpec) -> list[str]:
    return boot_argv(spec)
