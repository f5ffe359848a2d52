"""An in-process fake hypervisor backend, for fault injection at millisecond speed.

It implements ``nomad_vm.vm.hypervisor.Hypervisor`` the way the QEMU backend does, minus the
VM: its "VMM" is a real ``sleep`` process and each share gets a real stand-in helper process,
all spawned gated through ``nomad_vm.vm.process`` and reported to the launch recorder, so the
journal, its replay and "no process left behind" are exercised for real. The guest is
simulated in ``FakeHost`` (the machine: it outlives driver instances, as VMs outlive plugins).

Why under tests/ and not in the package: it is test equipment. A backend in the shipped wheel
that "starts" VMs without running one would be a fake success waiting to be configured by
mistake; the registry lets tests plug it in (``registry()``) without the plugin knowing it.

Guest behaviour comes from the kernel command line, like the tiny guest's
(``nomadvm.ignore_acpi=1``), plus the fake's own ``fake.then=poweroff|panic|reboot`` with
``fake.after=<seconds>`` (after boot). With a driver attached the act happens on time; while
none is, it happens when the test says so (``FakeHost.act_now``) and, as with QEMU's paused run
state, its verdict waits for the next reattach.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from nomad_vm.errors import LaunchError, Unsupported, VMRequestError
from nomad_vm.processes import ProcessIdentity, is_same_process
from nomad_vm.vm.accel import KvmStatus, choose_accelerator
from nomad_vm.vm.capabilities import HostFacts, HostSettings, HypervisorCapabilities
from nomad_vm.vm.description import VMDescription
from nomad_vm.vm.guest_agent import GuestAgent
from nomad_vm.vm.hypervisor import (
    VMM_ROLE,
    GuestEvent,
    GuestEventReport,
    LaunchRecorder,
    OneProcessVMM,
    TerminalPort,
    VMRef,
)
from nomad_vm.vm.launching import record_and_release
from nomad_vm.vm.process import SupervisedProcess, reattach, spawn
from nomad_vm.vm.registry import HypervisorRegistry
from nomad_vm.vm.request import BackendPlan, LaunchDevices, VMPlan, VMRequest
from nomad_vm.vm.share_transport import ShareTransport
from nomad_vm.vm.spec import VMExit

NAME = "fake"
SLEEP = "/bin/sleep"
CONTROL = "fake.sock"
VARS = "fake-vars.fd"
# The simulated guest powers off this long after the ACPI button, unless it ignores it.
ACPI_DELAY = 0.01
KVM = KvmStatus(False, "the fake hypervisor needs no KVM")

CAPABILITIES = HypervisorCapabilities(
    accelerators=("tcg",),
    firmware_kinds=("bios", "uefi"),
    disk_boot_firmware=("bios", "uefi"),
    machine_types=("pc", "q35"),
    arches=("x86_64",),
    share_transports=("virtiofs",),
    guest_agent=False,
    terminal_hotplug=False,
    pause=True,
    snapshot=False,
    verdict_survives_plugin_absence=True,
)


@dataclass
class FakeGuest:
    ignores_acpi: bool = False
    then: str = ""  # poweroff, panic or reboot
    after: float = 0.0
    # What the guest did that ended it ("poweroff" or "panic"), once it did.
    verdict: str = ""
    # Paused by the driver (kept by the "machine", as QEMU keeps its run state across plugins).
    paused: bool = False
    booted_at: float = field(default_factory=time.monotonic)
    reboots: int = 0
    # Queues of the VMs (drivers) watching this guest now.
    watchers: list[asyncio.Queue[GuestEventReport]] = field(default_factory=list)

    @classmethod
    def from_cmdline(cls, cmdline: str) -> FakeGuest:
        words = dict(w.split("=", 1) for w in cmdline.split() if "=" in w)
        return cls(
            ignores_acpi=words.get("nomadvm.ignore_acpi") == "1",
            then=words.get("fake.then", ""),
            after=float(words.get("fake.after", "0")),
        )


@dataclass
class FakeHost:
    """The simulated machine: guests by their VMM's identity, and every process spawned."""

    guests: dict[ProcessIdentity, FakeGuest] = field(default_factory=dict)
    spawned: list[ProcessIdentity] = field(default_factory=list)
    launches: int = 0

    def alive(self) -> list[ProcessIdentity]:
        """Processes the fake started that still run (a clean host has none)."""
        return [ident for ident in self.spawned if is_same_process(ident)]

    def act_now(self, vmm: ProcessIdentity) -> None:
        """The guest does its ``fake.then`` act now (while no driver may be watching)."""
        guest = self.guests[vmm]
        _act(guest, guest.then, vmm)


def _act(guest: FakeGuest, what: str, vmm: ProcessIdentity) -> None:
    """The guest powers off, panics or reboots; watchers hear it, and a guest that is done
    ends its VMM (as QEMU quits once the driver has read the verdict). Nobody watching: the
    verdict waits for a reattach, the VMM keeps running (QEMU's paused run state)."""
    if what == "reboot":
        guest.reboots += 1
        _tell(guest, GuestEventReport(GuestEvent.REBOOTED))
        return
    if guest.verdict:
        return
    guest.verdict = what
    event = GuestEvent.POWERED_OFF if what == "poweroff" else GuestEvent.PANICKED
    _tell(guest, GuestEventReport(event, "guest-shutdown" if what == "poweroff" else ""))
    if guest.watchers:
        _end(vmm)


def _tell(guest: FakeGuest, report: GuestEventReport) -> None:
    for queue in guest.watchers:
        queue.put_nowait(report)


def _end(vmm: ProcessIdentity) -> None:
    if is_same_process(vmm):
        with contextlib.suppress(ProcessLookupError):
            os.kill(vmm.pid, signal.SIGTERM)


@dataclass(frozen=True)
class FakePlan(BackendPlan):
    guest: FakeGuest


class FakeVM(OneProcessVMM):
    def __init__(
        self,
        host: FakeHost,
        process: SupervisedProcess,
        runtime_dir: Path,
        helpers: tuple[SupervisedProcess, ...],
    ) -> None:
        self.host = host
        self.process = process
        self.runtime_dir = runtime_dir
        self.helpers = helpers
        self.guest = host.guests[process.ident]
        self.events: asyncio.Queue[GuestEventReport] = asyncio.Queue()
        self.guest.watchers.append(self.events)
        self._timer: asyncio.TimerHandle | None = None
        self._ended: asyncio.Future[VMExit] | None = None

    def schedule(self) -> None:
        """The guest's ``fake.then`` act, ``fake.after`` seconds after its boot."""
        if self.guest.then and not self.guest.verdict:
            due = self.guest.booted_at + self.guest.after - time.monotonic()
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, due), self._act, self.guest.then)

    def _act(self, what: str) -> None:
        _act(self.guest, what, self.process.ident)

    @property
    def ref(self) -> VMRef:
        return VMRef(
            self.process.ident,
            self.runtime_dir / CONTROL,
            self.runtime_dir,
            tuple(h.ident for h in self.helpers),
        )

    async def guest_events(self) -> AsyncIterator[GuestEventReport]:
        exited = asyncio.ensure_future(self.process.wait())
        try:
            while True:
                nxt = asyncio.ensure_future(self.events.get())
                done, _ = await asyncio.wait({nxt, exited}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return
                yield nxt.result()
        finally:
            exited.cancel()

    helper_grace = 1.0

    def guest_verdict(self) -> str | None:
        return self.guest.verdict

    async def pause(self) -> None:
        self.guest.paused = True

    async def resume(self) -> None:
        self.guest.paused = False

    async def is_paused(self) -> bool:
        return self.guest.paused

    async def describe(self) -> VMDescription:
        return VMDescription(accelerator="tcg", vcpus=1, memory_bytes=128 * 2**20)

    async def power_down(self) -> bool:
        # A paused guest cannot see the button (its vCPUs do not run).
        if not self.guest.ignores_acpi and not self.guest.paused:
            asyncio.get_running_loop().call_later(ACPI_DELAY, self._act, "poweroff")
        return True

    async def guest_memory_used(self) -> int | None:
        return None  # the simulated guest has no balloon driver

    def guest_agent(self) -> GuestAgent | None:
        return None

    def console_socket(self) -> Path | None:
        return None  # the simulated guest has no console to type into

    async def open_terminal(self) -> TerminalPort:
        raise Unsupported("the fake hypervisor has no terminal ports")

    async def close_terminal(self, port: TerminalPort) -> None:
        raise Unsupported("the fake hypervisor has no terminal ports")

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._ended is not None and not self._ended.done():
            self._ended.cancel()
        with contextlib.suppress(ValueError):
            self.guest.watchers.remove(self.events)
        self.process.close()
        for helper in self.helpers:
            helper.close()


class FakeHypervisor:
    name = NAME
    capabilities = CAPABILITIES

    def __init__(self, host: FakeHost) -> None:
        self.host = host

    def check_host(self, settings: HostSettings) -> HostFacts:
        transport = ShareTransport("virtiofs", None, "the fake's stand-in helpers")
        try:
            accel = choose_accelerator(settings.accelerator, KVM)
        except VMRequestError as exc:  # the fingerprint names the setting
            return HostFacts(KVM, problem=exc, share_transport=transport)
        return HostFacts(KVM, accelerator=accel, share_transport=transport)

    async def plan(self, request: VMRequest, settings: HostSettings, runtime_dir: Path) -> VMPlan:
        accel = choose_accelerator(settings.accelerator, KVM)
        transport = ShareTransport("virtiofs", None, "the fake's stand-in helpers")
        shares = tuple(
            replace(s, socket=runtime_dir / f"share{i}.sock") for i, s in enumerate(request.shares)
        )
        guest = FakeGuest.from_cmdline(request.cmdline)
        return VMPlan(NAME, request, runtime_dir, accel, transport, shares, FakePlan(guest))

    async def launch(
        self, plan: VMPlan, devices: LaunchDevices, recorder: LaunchRecorder
    ) -> FakeVM:
        assert isinstance(plan.details, FakePlan)
        self.host.launches += 1
        if plan.request.firmware != "bios":
            await recorder.creating("firmware-vars", plan.runtime_dir / VARS)
            (plan.runtime_dir / VARS).write_bytes(b"\0" * 4096)
        # As QEMU does: the helpers first (recorded, released), then the VMM.
        helpers = [self._spawn(plan.runtime_dir) for _ in plan.shares]
        await record_and_release(recorder, helpers, "fake-helper")
        vmm = self._spawn(plan.runtime_dir)
        await record_and_release(recorder, [vmm], VMM_ROLE, helpers, plan.runtime_dir / CONTROL)
        self.host.guests[vmm.ident] = replace(
            plan.details.guest, watchers=[], booted_at=time.monotonic()
        )
        (plan.runtime_dir / CONTROL).write_text("the fake VMM's control socket\n")
        vm = FakeVM(self.host, vmm, plan.runtime_dir, tuple(helpers))
        vm.schedule()
        return vm

    def _spawn(self, runtime_dir: Path) -> SupervisedProcess:
        log_fd = os.open(runtime_dir / "fake.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            process = spawn(
                [SLEEP, "3600"], stdout=log_fd, stderr=log_fd, cwd=runtime_dir, gated=True
            )
        finally:
            os.close(log_fd)
        self.host.spawned.append(process.ident)
        return process

    async def reattach(self, ref: VMRef) -> FakeVM:
        if ref.vmm not in self.host.guests:
            raise LaunchError(f"the fake host never ran a VM as pid {ref.vmm.pid}")
        process = reattach(ref.vmm)
        helpers = tuple(reattach(h) for h in ref.helpers if is_same_process(h))
        vm = FakeVM(self.host, process, ref.runtime_dir, helpers)
        if vm.guest.verdict:  # it ended while nobody watched: read the verdict, end the VMM
            _end(ref.vmm)
        elif not vm.guest.reboots:  # an act still due happens on time (a reboot only once)
            vm.schedule()
        return vm


def registry(host: FakeHost) -> HypervisorRegistry:
    """A registry whose (only) backend is the fake."""
    return HypervisorRegistry({NAME: lambda: FakeHypervisor(host)}, default=NAME)


def tokens(ignores_acpi: bool = False, then: str = "", after: float = 0.0) -> str:
    """The fake guest's kernel command line words."""
    words = []
    if ignores_acpi:
        words.append("nomadvm.ignore_acpi=1")
    if then:
        words += [f"fake.then={then}", f"fake.after={after}"]
    return " ".join(words)
