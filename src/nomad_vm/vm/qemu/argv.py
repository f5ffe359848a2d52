"""VMSpec -> QEMU command line. A pure function, golden-tested (tests/unit/test_qemu_argv.py)."""

from __future__ import annotations

from nomad_vm.vm.spec import VMSpec

# The guest's first serial port is QEMU's stdout, which the driver connects to Nomad's task stdout
# FIFO: that is how the guest console reaches `nomad alloc logs`. signal=off keeps a Ctrl-C byte
# in the console from killing QEMU.
SERIAL_CHARDEV = "stdio,id=serial0,signal=off"


def opt(value: object) -> str:
    """A value inside a QEMU option string: a comma would start a new option (",," escapes it)."""
    return str(value).replace(",", ",,")


def qemu_argv(binary: str, spec: VMSpec) -> list[str]:
    argv = [
        binary,
        "-name",
        f"guest={opt(spec.name)},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        # `pc` is the machine where QMP system_powerdown reaches the guest under TCG too
        # (q35 with SMM does not; see docs/test-guests notes).
        "-machine",
        "pc",
        "-accel",
        spec.accelerator,
    ]
    if spec.accelerator == "kvm":
        argv += ["-cpu", "host"]
    argv += [
        "-smp",
        str(spec.vcpus),
        "-m",
        f"{spec.memory_mb}M",
        "-display",
        "none",
        "-vga",
        "none",
        "-chardev",
        SERIAL_CHARDEV,
        "-serial",
        "chardev:serial0",
        "-qmp",
        f"unix:{opt(spec.control_socket)},server=on,wait=off",
        # A guest power-off or panic pauses QEMU instead of ending it, so the verdict survives
        # in QEMU's run state until the driver (possibly restarted meanwhile) has read it.
        "-action",
        "shutdown=pause,panic=pause",
        # Lets the guest kernel tell QEMU it panicked (Linux's pvpanic driver).
        "-device",
        "pvpanic",
        # Memory statistics from inside the guest (used/available), for TaskStats.
        "-device",
        "virtio-balloon-pci,id=balloon0",
    ]
    if spec.disk is not None:
        argv += [
            "-drive",
            f"file={opt(spec.disk.path)},format={spec.disk.format},if=none,id=disk0,discard=unmap",
            "-device",
            "virtio-blk-pci,drive=disk0,bootindex=1",
        ]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.initramfs is not None:
            argv += ["-initrd", str(spec.initramfs)]
        if spec.cmdline:
            argv += ["-append", spec.cmdline]
    return argv
