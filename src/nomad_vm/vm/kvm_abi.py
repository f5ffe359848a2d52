"""The x86-64 KVM kernel ABI the probe speaks: ioctl request numbers, struct layouts and exit
codes, transcribed from <linux/kvm.h>, <asm/kvm.h> and <asm-generic/ioctl.h> (and checked by
compiling against the installed headers; tests/unit/test_accel.py pins the values).
"""

from __future__ import annotations

import ctypes

# --- ioctl request encoding, <asm-generic/ioctl.h> (x86 uses the generic layout) ---
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (KVMIO << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


# --- struct layouts, <linux/kvm.h> and <asm/kvm.h> for x86_64 ---
class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


_REG_NAMES = (
    *("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
    *("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"),
    *("rip", "rflags"),
)


class KvmRegs(ctypes.Structure):
    _fields_ = tuple((name, ctypes.c_uint64) for name in _REG_NAMES)


class KvmSegment(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class KvmDtable(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    _fields_ = (
        *((name, KvmSegment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *((name, ctypes.c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class _ExitHw(ctypes.Structure):
    _fields_ = (("hardware_exit_reason", ctypes.c_uint64),)


class _ExitFailEntry(ctypes.Structure):
    _fields_ = (("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32))


class _ExitIo(ctypes.Structure):
    _fields_ = (
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    )


class _ExitInternal(ctypes.Structure):
    _fields_ = (
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    )


class _ExitUnion(ctypes.Union):
    _fields_ = (
        ("hw", _ExitHw),
        ("fail_entry", _ExitFailEntry),
        ("io", _ExitIo),
        ("internal", _ExitInternal),
    )


class KvmRunPrefix(ctypes.Structure):
    """The start of ``struct kvm_run`` (the mmap of a vCPU fd): only the fields we read."""

    _fields_ = (
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("u", _ExitUnion),
    )


KVM_GET_API_VERSION = _ioc(_IOC_NONE, 0x00, 0)
KVM_CREATE_VM = _ioc(_IOC_NONE, 0x01, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(_IOC_NONE, 0x04, 0)
KVM_CREATE_VCPU = _ioc(_IOC_NONE, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _ioc(_IOC_NONE, 0x47, 0)
KVM_RUN = _ioc(_IOC_NONE, 0x80, 0)
KVM_GET_REGS = _ioc(_IOC_READ, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _ioc(_IOC_WRITE, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ioc(_IOC_READ, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _ioc(_IOC_WRITE, 0x84, ctypes.sizeof(KvmSregs))

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17

EXIT_NAMES: dict[int, str] = {
    0: "KVM_EXIT_UNKNOWN",
    1: "KVM_EXIT_EXCEPTION",
    2: "KVM_EXIT_IO",
    3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG",
    5: "KVM_EXIT_HLT",
    6: "KVM_EXIT_MMIO",
    7: "KVM_EXIT_IRQ_WINDOW_OPEN",
    8: "KVM_EXIT_SHUTDOWN",
    9: "KVM_EXIT_FAIL_ENTRY",
    10: "KVM_EXIT_INTR",
    11: "KVM_EXIT_SET_TPR",
    12: "KVM_EXIT_TPR_ACCESS",
    16: "KVM_EXIT_NMI",
    17: "KVM_EXIT_INTERNAL_ERROR",
    24: "KVM_EXIT_SYSTEM_EVENT",
    26: "KVM_EXIT_IOAPIC_EOI",
    27: "KVM_EXIT_HYPERV",
    31: "KVM_EXIT_DIRTY_RING_FULL",
    34: "KVM_EXIT_XEN",
    37: "KVM_EXIT_NOTIFY",
}

INTERNAL_SUBERRORS: dict[int, str] = {
    1: "KVM_INTERNAL_ERROR_EMULATION",
    2: "KVM_INTERNAL_ERROR_SIMUL_EX",
    3: "KVM_INTERNAL_ERROR_DELIVERY_EV",
    4: "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
}
