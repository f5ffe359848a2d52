"""The hypervisor interface: what the driver asks of a backend, in the backend's own terms.

Derived from what ``nomad_vm.driver`` really does with a VM: check the host (fingerprint), plan
a VM from a hypervisor-neutral request (validation per backend), launch it, find it again from
a stored reference after a plugin restart, and drive the running VM (guest events, wait,
graceful power-down, terminate, kill, usage, guest memory, the guest agent, a terminal port).

This module holds the two Protocols (``Hypervisor``, ``RunningVM``) and what a running VM deals
in (``VMRef``, guest events, usage, terminal ports, the ``LaunchRecorder``). What a backend can
do is declared once, in its ``capabilities`` (``nomad_vm.vm.capabilities``, with the host's
settings and facts); the driver asks that value and never imports a backend module
(``tests/unit/test_layers.py``). A VM as asked and planned is ``nomad_vm.vm.request``. Nothing
here knows Nomad: errors name the request's option (``VMRequestError.option``), and the driver
names the config field.

Every host change a launch makes is reported to a ``LaunchRecorder`` first (files before they
are created; processes between fork and exec, see ``nomad_vm.vm.process``), so that the task's
journal knows it before it exists. A launch that fails undoes its own changes; the journal
covers the case where nobody is left to undo them (the plugin was killed).
"""

from __future__ import annotations

import asyncio
import enum
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

from nomad_vm.errors import HypervisorError, Unsupported
from nomad_vm.processes import ProcessIdentity
from nomad_vm.vm.capabilities import HostFacts, HostSettings, HypervisorCapabilities
from nomad_vm.vm.description import VMDescription
from nomad_vm.vm.request import LaunchDevices, VMPlan, VMRequest
from nomad_vm.vm.spec import VMExit

if TYPE_CHECKING:
    from nomad_vm.vm.guest_agent import GuestAgent
    from nomad_vm.vm.process import SupervisedProcess


@dataclass(frozen=True)
class SpawnedProcess:
    """A process a launch forked: ``role`` is ``vmm`` for the VMM, else a helper's name."""

    role: str
    ident: ProcessIdentity


VMM_ROLE = "vmm"


@dataclass(frozen=True)
class VMRef:
    """What a backend needs to find its running VM again after a plugin restart."""

    vmm: ProcessIdentity
    control_socket: Path
    runtime_dir: Path
    helpers: tuple[ProcessIdentity, ...] = ()


class GuestEvent(enum.Enum):
    """What the guest did, as the VMM reports it."""

    REBOOTED = "rebooted"
    POWERED_OFF = "powered off"
    PANICKED = "panicked"


@dataclass(frozen=True)
class GuestEventReport:
    event: GuestEvent
    # The VMM's own words, e.g. QEMU's shutdown reason ("guest-shutdown").
    detail: str = ""


@dataclass(frozen=True)
class VMUsage:
    """Raw host-side measurements of the VMM process."""

    user_seconds: float
    system_seconds: float
    rss_bytes: int

    @classmethod
    def of(cls, pid: int) -> VMUsage:
        """CPU times and RSS of the VMM process ``pid``, as every backend measures them."""
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                times = proc.cpu_times()
                rss = proc.memory_info().rss
        except psutil.Error as exc:
            raise HypervisorError(f"cannot read usage of the VMM (pid {pid}): {exc}") from exc
        return cls(times.user, times.system, rss)


@dataclass(frozen=True)
class GuestMemory:
    """The guest's memory by its own account (bytes): what it has (``total``, hot-plugged
    memory included) and what it could still use without swapping (``available``);
    ``reported_at``: when the guest sent them (the VMM's clock, seconds; 0: not known)."""

    total: int
    available: int
    reported_at: float = 0.0


@dataclass(frozen=True)
class HotplugMemory:
    """A VM's hot-pluggable memory as the VMM says (bytes): at most ``region``; the driver
    asked for ``requested``; the guest has taken ``plugged`` (it follows ``requested`` as
    fast as the guest plugs or frees blocks)."""

    region: int
    requested: int
    plugged: int


class OneProcessVMM:
    """``wait``, ``terminate``, ``kill`` and ``usage`` of a RunningVM whose VMM is one process
    (``self.process``) with helpers (``self.helpers``, e.g. virtiofsd): the same for every
    backend that runs one. A backend says what the guest did (``guest_verdict``) and what a
    VMM exit without such a verdict means (``vmm_exit``)."""

    process: SupervisedProcess
    helpers: tuple[SupervisedProcess, ...]
    # A helper (virtiofsd) exits as soon as the VMM closes its socket; one that has not
    # after this long is killed.
    helper_grace: float = 5.0
    _ended: asyncio.Future[VMExit] | None = None
    # (vCPU index, host CPU) of each vCPU the launch pinned (VMRequest.pin_cpus); empty: none.
    vcpu_pinning: tuple[tuple[int, int], ...] = ()

    async def wait(self) -> VMExit:
        """How the VM ended, once it has; concurrent callers share the one wait."""
        if self._ended is None:
            self._ended = asyncio.ensure_future(self._wait_once())
        return await asyncio.shield(self._ended)

    async def _wait_once(self) -> VMExit:
        ended = await self.process.wait()
        for helper in self.helpers:
            await helper.terminate(self.helper_grace)
        verdict = self.guest_verdict()
        if verdict == "poweroff":
            return VMExit(0, None, "the guest powered off", guest_poweroff=True)
        if verdict == "panic":
            return VMExit(None, None, "the guest kernel panicked", panicked=True)
        return self.vmm_exit(ended)

    def guest_verdict(self) -> str | None:
        """ "poweroff" or "panic" when the guest itself ended the VM, else None."""
        return None

    def vmm_exit(self, ended: VMExit) -> VMExit:
        """The VM's exit when the VMM ended (as ``ended``) without a guest verdict."""
        return ended

    async def terminate(self, grace: float) -> None:
        """End the VMM now: SIGTERM, SIGKILL after ``grace`` seconds."""
        await self.process.terminate(grace)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)

    def usage(self) -> VMUsage:
        return VMUsage.of(self.process.pid)

    async def device_io(self) -> Mapping[str, Mapping[str, int]]:
        """Per-device I/O counters, by device id; empty where the backend has none."""
        return {}

    async def guest_memory(self) -> GuestMemory | None:
        """The guest's total and available memory; None where the backend cannot say."""
        return None

    async def hotplug_memory(self) -> HotplugMemory | None:
        """The VM's hot-pluggable memory; None when it has none."""
        return None

    async def resize_hotplug_memory(self, requested: int) -> None:
        """Ask the guest to hold ``requested`` bytes of hot-pluggable memory."""
        raise Unsupported("this VM has no hot-pluggable memory")


@dataclass(frozen=True)
class TerminalPort:
    """A port hot-plugged for one interactive session: ``name`` is what the guest sees (under
    /sys/class/virtio-ports), ``socket`` its host side. ``token`` tells sessions apart."""

    token: str
    name: str
    socket: Path = field(compare=False)


class LaunchRecorder(Protocol):
    """The task's journal as a launch sees it: told of each host change before it exists."""

    async def creating(self, what: str, path: Path) -> None:
        """``path`` (``what``: e.g. ``firmware-vars``) is about to be created."""

    async def spawned(
        self, processes: Sequence[SpawnedProcess], control_socket: Path | None = None
    ) -> None:
        """These processes were just forked and wait at their gate; they are released (and
        their programs run) only after this returns. Helpers and the VMM may come in separate
        calls (helpers first, so they are up when the VMM needs them); ``control_socket``, with
        the VMM, is where it will answer. Raising here makes the launch fail and end them."""


class RunningVM(Protocol):
    """One VM that a launch started or a reattach found."""

    # (vCPU index, host CPU) of each vCPU the launch pinned; empty when none was.
    vcpu_pinning: tuple[tuple[int, int], ...]

    @property
    def ref(self) -> VMRef: ...

    def guest_events(self) -> AsyncIterator[GuestEventReport]:
        """What the guest does, until the VM ends (the iterator then stops)."""
        ...

    async def wait(self) -> VMExit:
        """How the VM ended; waits until it has. May be awaited by several callers."""
        ...

    async def power_down(self) -> bool:
        """Press the ACPI power button; False when the VMM cannot be asked."""
        ...

    async def terminate(self, grace: float) -> None:
        """End the VMM now: asked to exit, killed after ``grace`` seconds."""
        ...

    async def pause(self) -> None:
        """Stop the vCPUs (``pause`` backends only; Unsupported otherwise). The VMM stays, its
        devices too; HypervisorError when the VMM refuses or does not answer."""
        ...

    async def resume(self) -> None:
        """Run the vCPUs of a paused VM again (``pause`` backends only)."""
        ...

    async def is_paused(self) -> bool:
        """Whether the VM is paused by ``pause`` (asked of the VMM, so it holds after a plugin
        restart). A VM the guest itself ended (power-off, panic) is not "paused" here, even
        where the VMM keeps it stopped to remember that verdict."""
        ...

    async def save_state(self, fd: int, timeout: float) -> int:
        """Write a paused VM's memory and device state to ``fd`` (``snapshot`` backends
        only; Unsupported otherwise) and flush its disks; the VM stays paused, and a restore
        is a launch with ``LaunchDevices.restore_fd``. Returns the guest RAM's size in bytes.
        HypervisorError when the VMM fails or exceeds ``timeout``."""
        ...

    def kill(self) -> None:
        """SIGKILL the VMM (``wait`` then reports it)."""
        ...

    def usage(self) -> VMUsage:
        """CPU and memory of the VMM process (blocking: call it in a thread)."""
        ...

    async def guest_memory_used(self) -> int | None:
        """Bytes the guest uses by its own account (balloon statistics); None when unknown."""
        ...

    async def device_io(self) -> Mapping[str, Mapping[str, int]]:
        """Per-device I/O counters (device id -> counter -> value); empty when unknown."""
        ...

    async def guest_memory(self) -> GuestMemory | None:
        """Total and available memory by the guest's own account; None when unknown."""
        ...

    async def hotplug_memory(self) -> HotplugMemory | None:
        """Hot-pluggable memory as the VMM says (read back after a plugin restart); None
        when the VM has none."""
        ...

    async def resize_hotplug_memory(self, requested: int) -> None:
        """Ask for ``requested`` bytes of hot-pluggable memory (0 to the region's size;
        ``memory_hotplug`` backends). The guest plugs or unplugs at its own pace;
        HypervisorError when the VMM refuses."""
        ...

    async def describe(self) -> VMDescription:
        """What the VMM says it runs (operator view); HypervisorError when it cannot be asked."""
        ...

    def guest_agent(self) -> GuestAgent | None:
        """A new client for the guest agent's channel; None when the VM has none."""
        ...

    def console_socket(self) -> Path | None:
        """Where the serial console is served (one client at a time: bytes in are the guest's
        input, bytes out its output); None when this VM has none (``serial_console`` backends
        only, and VMs started by a plugin without it)."""
        ...

    async def open_terminal(self) -> TerminalPort:
        """Hot-plug a port for one interactive session (``terminal_hotplug`` backends only)."""
        ...

    async def close_terminal(self, port: TerminalPort) -> None:
        """Unplug a session's port and remove its socket."""
        ...

    async def close(self) -> None:
        """Drop this plugin's connections to the VM (the VM keeps running)."""
        ...


class Hypervisor(Protocol):
    """A backend. One instance serves every task; per-task state lives in plans and VMs."""

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> HypervisorCapabilities: ...

    def check_host(self, settings: HostSettings) -> HostFacts:
        """Can this host run VMs with ``settings``? Blocking (runs probes): call in a thread."""
        ...

    async def plan(self, request: VMRequest, settings: HostSettings, runtime_dir: Path) -> VMPlan:
        """Validate ``request`` for this backend without touching the host. VMRequestError
        names the request's option (or the setting) that cannot be honoured."""
        ...

    async def launch(
        self, plan: VMPlan, devices: LaunchDevices, recorder: LaunchRecorder
    ) -> RunningVM:
        """Create the VM's own files, start its processes and return once the VMM answers on
        its control socket. On failure (or cancellation) nothing it started is left running."""
        ...

    async def reattach(self, ref: VMRef) -> RunningVM:
        """Find a VM started by an earlier plugin process; HypervisorError when it is gone.
        Never starts anything."""
        ...
