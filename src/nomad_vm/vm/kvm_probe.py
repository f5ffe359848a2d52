"""Find out whether /dev/kvm can really run an x86 guest, by running one.

A device node that opens proves little. On a paravirtual nested KVM (PVM) every ioctl succeeds,
but a guest kernel that is not PVM-aware either fails outright or runs through KVM's instruction
emulator, about a thousand times slower than hardware and far slower than QEMU's TCG: a Debian
kernel under ``accel=kvm`` seems to hang after "Probing EDD". The only honest test is to run
guest code and time it. This module builds the smallest possible VM through the raw KVM ioctls
(no QEMU), with one vCPU and a few pages of guest memory, and runs it twice:

1. correctness: ``mov al,0x42; hlt`` at guest physical address 0, the vCPU in real mode with
   CS base 0 and RIP 0. A usable KVM exits with KVM_EXIT_HLT and AL = 0x42; a broken one
   exits with e.g. KVM_EXIT_INTERNAL_ERROR (17).
2. speed: a 65536-iteration ``dec ecx; jnz`` loop in 64-bit long mode, where a kernel spends its
   time. Hardware runs it in tens of microseconds; an emulator needs tens of milliseconds.

Run it as ``python -m nomad_vm.vm.kvm_probe [--timeout S]``: it prints one JSON line
``{"usable": bool, "reason": str}`` and exits 0. It is a separate process because a broken
KVM_RUN can hang in the kernel; ``nomad_vm.vm.accel.probe_kvm`` runs it with a deadline.

Only the standard library is used (ctypes, fcntl, mmap) so the probe is cheap to start. Every
ioctl number and struct layout below was checked against the Linux UAPI headers
(``<linux/kvm.h>``, ``<asm/kvm.h>``, ``<asm-generic/ioctl.h>``) from linux-libc-dev.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import mmap
import os
import platform
import signal
import sys
import time
from contextlib import ExitStack
from types import FrameType

from nomad_vm.vm.kvm_abi import (
    EXIT_NAMES,
    INTERNAL_SUBERRORS,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_IO,
    KVM_EXIT_UNKNOWN,
    KVM_GET_API_VERSION,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_TSS_ADDR,
    KVM_SET_USER_MEMORY_REGION,
    KvmRegs,
    KvmRunPrefix,
    KvmSegment,
    KvmSregs,
    KvmUserspaceMemoryRegion,
)

KVM_DEVICE = "/dev/kvm"
KVM_API_VERSION = 12
DEFAULT_RUN_TIMEOUT = 5.0

# Guest memory, one page each: real-mode test code at 0 (where CS base 0 / RIP 0 points), then
# the 64-bit page tables, then the 64-bit loop.
PAGE = 0x1000
REAL_MODE_CODE_ADDRESS = 0x0000
PML4_ADDRESS = 0x1000
PDPT_ADDRESS = 0x2000
PD_ADDRESS = 0x3000
LOOP_CODE_ADDRESS = 0x4000
GUEST_MEMORY_SIZE = 0x5000

# "mov al, 0x42" then "hlt".
REAL_MODE_CODE = b"\xb0\x42\xf4"
TEST_AL = 0x42
# "mov ecx, imm32" with the iteration count appended, then "l: dec ecx; jnz l; mov al,0x42; hlt".
LOOP_ITERATIONS = 1 << 16
LOOP_CODE = b"\xb9" + LOOP_ITERATIONS.to_bytes(4, "little") + b"\xff\xc9\x75\xfc\xb0\x42\xf4"
# Hardware needs roughly 20-100 us for the loop (more when nested), KVM's emulator 30-70 ms. The
# limit sits far from both; the best of a few attempts absorbs a host that preempts the vCPU.
LOOP_LIMIT_SECONDS = 0.005
LOOP_ATTEMPTS = 3

# QEMU puts the TSS three pages below 4 GiB minus 16 MiB (target/i386/kvm); older Intel CPUs
# without "unrestricted guest" emulate real mode through vm86 and need it. We copy QEMU so the
# probe sees what QEMU would see, and so such hosts are not wrongly reported as unusable.
TSS_ADDRESS = 0xFEFFD000
# Bit 1 of RFLAGS is reserved and must be 1 (Intel SDM vol. 1, 3.4.3).
RFLAGS_RESERVED = 0x2
# Long mode as a 64-bit kernel runs it: CR0 = PE|MP|ET|NE|WP|AM|PG (CD/NW clear, so caching is
# on), CR4 = PAE, EFER = LME|LMA. Page-table entries: present|writable, plus PS for a 2 MiB page.
LONG_MODE_CR0 = 0x80050033
LONG_MODE_CR4 = 0x20
LONG_MODE_EFER = 0x500
PTE_PRESENT_WRITABLE = 0x3
PDE_LARGE_PAGE = 0x80
CODE64_SELECTOR = 0x08
DATA_SELECTOR = 0x10
SEGMENT_TYPE_CODE = 0xB  # execute/read, accessed
SEGMENT_TYPE_DATA = 0x3  # read/write, accessed


class ProbeFailure(Exception):
    """A step of the probe failed; ``reason`` is the sentence reported to the operator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _RunTimedOut(Exception):
    """Raised from the SIGALRM handler so a hung KVM_RUN returns (with EINTR) to us."""


def _ioctl(fd: int, request: int, arg: int | ctypes.Structure, what: str) -> int:
    """One ioctl; an OSError becomes a ProbeFailure naming the call, so reasons are concrete."""
    try:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as exc:
        raise _ioctl_failure(what, exc.errno or 0) from exc


def _ioctl_failure(what: str, err: int) -> ProbeFailure:
    return ProbeFailure(f"{what} failed: {os.strerror(err)} ({errno.errorcode.get(err, '?')})")


def _ioctl_ulong(fd: int, request: int, value: int, what: str) -> None:
    """An ioctl whose argument is an unsigned long above INT_MAX.

    fcntl.ioctl passes integer arguments as a C int and rejects larger values, so go through
    libc's ioctl with an explicit unsigned long. Only used for calls that cannot hang.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
    libc.ioctl.restype = ctypes.c_int
    if libc.ioctl(fd, request, value) < 0:
        raise _ioctl_failure(what, ctypes.get_errno())


def _open_device(device: str, stack: ExitStack) -> int:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ProbeFailure(f"{device} does not exist") from exc
    except PermissionError as exc:
        raise ProbeFailure(f"{device}: permission denied") from exc
    except OSError as exc:
        raise ProbeFailure(f"{device}: cannot open: {exc.strerror}") from exc
    stack.callback(os.close, fd)
    return fd


def _guest_memory(stack: ExitStack) -> tuple[mmap.mmap, int]:
    """Anonymous guest memory with both test programs and the page tables, and its address."""
    memory = mmap.mmap(
        -1,
        GUEST_MEMORY_SIZE,
        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
    )
    stack.callback(memory.close)
    _put(memory, REAL_MODE_CODE_ADDRESS, REAL_MODE_CODE)
    _put(memory, LOOP_CODE_ADDRESS, LOOP_CODE)
    # Identity-map the first 2 MiB with one large page: PML4[0] -> PDPT[0] -> PD[0].
    _put(memory, PML4_ADDRESS, (PDPT_ADDRESS | PTE_PRESENT_WRITABLE).to_bytes(8, "little"))
    _put(memory, PDPT_ADDRESS, (PD_ADDRESS | PTE_PRESENT_WRITABLE).to_bytes(8, "little"))
    _put(memory, PD_ADDRESS, (PTE_PRESENT_WRITABLE | PDE_LARGE_PAGE).to_bytes(8, "little"))
    # from_buffer exports the mmap; drop the view at once or memory.close() raises BufferError.
    view = ctypes.c_char.from_buffer(memory)
    address = ctypes.addressof(view)
    del view
    return memory, address


def _put(memory: mmap.mmap, address: int, data: bytes) -> None:
    memory[address : address + len(data)] = data


def _create_vm(kvm_fd: int, guest_address: int, stack: ExitStack) -> int:
    version = _ioctl(kvm_fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    if version != KVM_API_VERSION:
        raise ProbeFailure(f"KVM API version is {version}, expected {KVM_API_VERSION}")
    vm_fd = _ioctl(kvm_fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM")
    stack.callback(os.close, vm_fd)
    _ioctl_ulong(vm_fd, KVM_SET_TSS_ADDR, TSS_ADDRESS, "KVM_SET_TSS_ADDR")
    region = KvmUserspaceMemoryRegion(
        slot=0,
        flags=0,
        guest_phys_addr=0,
        memory_size=GUEST_MEMORY_SIZE,
        userspace_addr=guest_address,
    )
    _ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
    return vm_fd


def _create_vcpu(kvm_fd: int, vm_fd: int, stack: ExitStack) -> tuple[int, mmap.mmap]:
    """A vCPU fd and the mmap of its ``struct kvm_run``, where KVM_RUN reports the exit."""
    vcpu_fd = _ioctl(vm_fd, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
    stack.callback(os.close, vcpu_fd)
    run_size = _ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
    if run_size < ctypes.sizeof(KvmRunPrefix):
        raise ProbeFailure(f"KVM_GET_VCPU_MMAP_SIZE returned {run_size}, too small for kvm_run")
    try:
        run = mmap.mmap(vcpu_fd, run_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except OSError as exc:
        raise ProbeFailure(f"mmap of the vCPU fd failed: {exc.strerror}") from exc
    stack.callback(run.close)
    return vcpu_fd, run


def _enter_real_mode(vcpu_fd: int) -> None:
    """Point the vCPU at the real-mode code: reset state has CS base 0xffff0000, we want 0."""
    sregs = KvmSregs()
    _ioctl(vcpu_fd, KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
    sregs.cs.base = 0
    sregs.cs.selector = 0
    _ioctl(vcpu_fd, KVM_SET_SREGS, sregs, "KVM_SET_SREGS")
    _set_rip(vcpu_fd, REAL_MODE_CODE_ADDRESS)


def _set_rip(vcpu_fd: int, rip: int) -> None:
    regs = KvmRegs()
    _ioctl(vcpu_fd, KVM_GET_REGS, regs, "KVM_GET_REGS")
    regs.rip = rip
    regs.rflags = RFLAGS_RESERVED
    _ioctl(vcpu_fd, KVM_SET_REGS, regs, "KVM_SET_REGS")


def _flat_segment(segment: KvmSegment, selector: int, seg_type: int, *, code: bool) -> None:
    """A flat 4 GiB segment; a 64-bit code segment has L set and D clear (SDM vol. 3, 5.2.1)."""
    segment.base = 0
    segment.limit = 0xFFFFFFFF
    segment.selector = selector
    segment.type = seg_type
    segment.present = 1
    segment.dpl = 0
    segment.db = 0 if code else 1
    segment.s = 1
    segment.l = 1 if code else 0
    segment.g = 1
    segment.avl = 0
    segment.unusable = 0


def _enter_long_mode(vcpu_fd: int) -> None:
    """Load 64-bit state directly, as Firecracker-style VMMs do: no GDT in memory is needed
    because the segment caches come from KVM_SET_SREGS and the loop never reloads a segment."""
    sregs = KvmSregs()
    _ioctl(vcpu_fd, KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
    _flat_segment(sregs.cs, CODE64_SELECTOR, SEGMENT_TYPE_CODE, code=True)
    for segment in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _flat_segment(segment, DATA_SELECTOR, SEGMENT_TYPE_DATA, code=False)
    sregs.cr3 = PML4_ADDRESS
    sregs.cr4 = LONG_MODE_CR4
    sregs.cr0 = LONG_MODE_CR0
    sregs.efer = LONG_MODE_EFER
    _ioctl(vcpu_fd, KVM_SET_SREGS, sregs, "KVM_SET_SREGS (long mode)")


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise _RunTimedOut


def _run_once(vcpu_fd: int, run: mmap.mmap, deadline: float, budget: float) -> KvmRunPrefix:
    """KVM_RUN with an alarm: a pending signal makes KVM_RUN return, so a hang is reported."""
    remaining = max(deadline - time.monotonic(), 0.001)
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, remaining)
    try:
        _ioctl(vcpu_fd, KVM_RUN, 0, "KVM_RUN")
    except _RunTimedOut as exc:
        raise ProbeFailure(f"KVM_RUN did not return within {budget:g} s") from exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return KvmRunPrefix.from_buffer_copy(run)


def describe_exit(run: KvmRunPrefix) -> str:
    """The exit reason as a name and number, with the detail KVM gives for that exit."""
    reason = int(run.exit_reason)
    text = f"{EXIT_NAMES.get(reason, 'unknown exit')} ({reason})"
    if reason == KVM_EXIT_INTERNAL_ERROR:
        sub = int(run.u.internal.suberror)
        text += f", suberror {sub} ({INTERNAL_SUBERRORS.get(sub, 'unknown')})"
    elif reason == KVM_EXIT_FAIL_ENTRY:
        code = int(run.u.fail_entry.hardware_entry_failure_reason)
        text += f", hardware entry failure reason {code:#x}"
    elif reason == KVM_EXIT_UNKNOWN:
        text += f", hardware exit reason {run.u.hw.hardware_exit_reason:#x}"
    elif reason == KVM_EXIT_IO:
        text += f", port {run.u.io.port:#x}"
    return text


def _expect_halt(vcpu_fd: int, run: KvmRunPrefix, what: str) -> None:
    """Raise unless the vCPU halted with AL = 0x42, which proves our code ran to its end."""
    if run.exit_reason != KVM_EXIT_HLT:
        raise ProbeFailure(
            f"KVM_RUN of {what} ended with {describe_exit(run)} instead of KVM_EXIT_HLT"
        )
    regs = KvmRegs()
    _ioctl(vcpu_fd, KVM_GET_REGS, regs, "KVM_GET_REGS after KVM_RUN")
    al = regs.rax & 0xFF
    if al != TEST_AL:
        raise ProbeFailure(f"{what} halted but AL is {al:#04x}, expected {TEST_AL:#04x}")


def _time_loop(vcpu_fd: int, run_map: mmap.mmap, deadline: float, budget: float) -> float:
    """Best time of up to LOOP_ATTEMPTS runs of the 64-bit loop, in seconds."""
    _enter_long_mode(vcpu_fd)
    best = float("inf")
    for _ in range(LOOP_ATTEMPTS):
        _set_rip(vcpu_fd, LOOP_CODE_ADDRESS)
        started = time.perf_counter()
        run = _run_once(vcpu_fd, run_map, deadline, budget)
        elapsed = time.perf_counter() - started
        _expect_halt(vcpu_fd, run, "the 64-bit test loop")
        best = min(best, elapsed)
        if best < LOOP_LIMIT_SECONDS:
            break
    return best


def _speed_verdict(seconds: float) -> tuple[bool, str]:
    measured = f"a {LOOP_ITERATIONS}-iteration loop in 64-bit mode took {seconds * 1000:.2f} ms"
    if seconds < LOOP_LIMIT_SECONDS:
        return True, (
            "real-mode test code ended with KVM_EXIT_HLT (5) and AL = 0x42, "
            f"and {measured} (hardware speed)"
        )
    return False, (
        f"KVM does not run guest code at hardware speed: {measured} "
        f"(hardware needs well under 1 ms; limit {LOOP_LIMIT_SECONDS * 1000:g} ms), "
        "so it is emulating the guest and guests would run far slower than under TCG"
    )


def probe(device: str = KVM_DEVICE, timeout: float = DEFAULT_RUN_TIMEOUT) -> tuple[bool, str]:
    """Run the test VM; return (usable, reason). Never raises for KVM trouble.

    ``timeout`` bounds all KVM_RUN calls together, so the probe ends in about that time. It
    uses SIGALRM, so call it from the main thread (the CLI entry point does).
    """
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return False, f"host architecture is {machine}; KVM here cannot run x86_64 guests"
    deadline = time.monotonic() + timeout
    try:
        with ExitStack() as stack:
            # Guest memory first, so it is unmapped last, after the VM that points at it.
            _memory, guest_address = _guest_memory(stack)
            kvm_fd = _open_device(device, stack)
            vm_fd = _create_vm(kvm_fd, guest_address, stack)
            vcpu_fd, run_map = _create_vcpu(kvm_fd, vm_fd, stack)
            _enter_real_mode(vcpu_fd)
            run = _run_once(vcpu_fd, run_map, deadline, timeout)
            _expect_halt(vcpu_fd, run, "real-mode test code")
            return _speed_verdict(_time_loop(vcpu_fd, run_map, deadline, timeout))
    except ProbeFailure as exc:
        return False, exc.reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Test whether /dev/kvm can run x86 guests.")
    parser.add_argument("--device", default=KVM_DEVICE)
    parser.add_argument("--timeout", type=float, default=DEFAULT_RUN_TIMEOUT)
    args = parser.parse_args(argv)
    try:
        usable, reason = probe(args.device, args.timeout)
    except Exception as exc:  # the contract is one JSON line and exit 0, even for our own bugs
        usable, reason = False, f"KVM probe failed unexpectedly: {exc!r}"
    print(json.dumps({"usable": usable, "reason": reason}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
