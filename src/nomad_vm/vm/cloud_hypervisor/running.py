"""One running Cloud Hypervisor: its process, its API, and the event-monitor file.

How a VM's end is known, even when the plugin was not running at that moment:

* CH runs with ``--no-shutdown``: when the guest powers off, CH tears the VM down but the VMM
  stays, with the VM's config (``vm.info`` says ``Created``), and the event file has a
  ``vm``/``shutdown`` event. A panic (pvpanic) is a ``guest``/``panic`` event, and the VMM keeps
  running. The plugin, live or restarted, reads the file, records the verdict and then tells CH
  to exit (``vmm.shutdown``), as the QEMU backend quits a paused QEMU.
* ``vm``/``shutdown`` is also written on CH's way out (SIGTERM, ``vmm.shutdown``), but then the
  API no longer answers: CH handles its exit and API calls in one loop, so a ``vm.info`` that
  answers after the event means the guest did it.
* CH ending without a verdict was ended by us (``terminate``: SIGTERM, on which CH exits 0), by
  someone else, or crashed; as its parent the plugin has the exit status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import HypervisorError, Unsupported
from nomad_vm.files import read_log_tail
from nomad_vm.vm.cloud_hypervisor import snapshot
from nomad_vm.vm.cloud_hypervisor.client import ChClient
from nomad_vm.vm.cloud_hypervisor.events import EventFile, EventFormatError, MonitorEvent
from nomad_vm.vm.cloud_hypervisor.files import (
    API_SOCKET,
    EVENTS_FILE,
    LOG_NAME,
    VMM_DIR,
    VSOCK_SOCKET,
)
from nomad_vm.vm.cloud_hypervisor.model import VmState
from nomad_vm.vm.cloud_hypervisor.vm_config import AGENT_PORT
from nomad_vm.vm.description import DiskView, VMDescription
from nomad_vm.vm.guest_agent import GuestAgent
from nomad_vm.vm.hypervisor import (
    GuestEvent,
    GuestEventReport,
    OneProcessVMM,
    TerminalPort,
    VMRef,
)
from nomad_vm.vm.process import SupervisedProcess
from nomad_vm.vm.spec import VMExit

log = logging.getLogger(__name__)
# How CH is given the files it opens as vm_user (``vmm_files``): inherited descriptors.
PROC_SELF_FD = re.compile(r"/proc/self/fd/(\d+)")

# How often the event file is read while the VMM runs (a few events per boot; reading a small
# file is cheap, and CH offers no other channel that outlives the plugin).
EVENT_POLL = 0.1
# The VM's states once the guest has powered it off (the VMM keeps its config).
POWERED_OFF_STATES = (VmState.CREATED, VmState.SHUTDOWN)


@dataclass(frozen=True)
class LogSpot:
    """Where CH's messages go, and from which byte on they are this VM's (a shared log_file)."""

    path: Path
    offset: int = 0

    def tail(self) -> str:
        return read_log_tail(self.path, start=self.offset)


class CloudHypervisorVM(OneProcessVMM):
    def __init__(
        self,
        process: SupervisedProcess,
        client: ChClient | None,
        runtime_dir: Path,
        helpers: tuple[SupervisedProcess, ...] = (),
        log_spot: LogSpot | None = None,
    ) -> None:
        self.process = process
        self.client = client
        self.runtime_dir = runtime_dir
        self.helpers = helpers
        self.log_spot = log_spot or LogSpot(runtime_dir / LOG_NAME)
        self.events = EventFile(runtime_dir / EVENTS_FILE)
        # "poweroff" or "panic", once the guest did it.
        self.guest_end: str | None = None
        self._quitting = False
        self._terminated = False
        self._ended: asyncio.Future[VMExit] | None = None

    @property
    def ref(self) -> VMRef:
        return VMRef(
            vmm=self.process.ident,
            control_socket=self.runtime_dir / API_SOCKET,
            runtime_dir=self.runtime_dir,
            helpers=tuple(h.ident for h in self.helpers),
        )

    async def guest_events(self) -> AsyncIterator[GuestEventReport]:
        """What the guest does, from the event file, until CH exits (then the rest is read)."""
        exited = asyncio.ensure_future(self.process.wait())
        try:
            while True:
                for event in self._read():
                    report = await self._handle(event)
                    if report is not None:
                        yield report
                if exited.done():
                    return
                await asyncio.wait({exited}, timeout=EVENT_POLL)
        finally:
            exited.cancel()

    def _read(self) -> list[MonitorEvent]:
        try:
            return self.events.read_new()
        except (EventFormatError, OSError) as exc:
            log.warning("cannot read Cloud Hypervisor's events: %s", exc)
            return []

    async def _handle(self, event: MonitorEvent) -> GuestEventReport | None:
        if event.is_("vm", "rebooted"):
            return GuestEventReport(GuestEvent.REBOOTED)
        if self.guest_end is not None or self._quitting:
            return None
        if event.is_("guest", "panic") and event.properties.get("event", "panicked") == "panicked":
            self.guest_end = "panic"
            await self._quit()
            return GuestEventReport(GuestEvent.PANICKED)
        if event.is_("vm", "shutdown") and await self._vm_powered_off():
            self.guest_end = "poweroff"
            await self._quit()
            return GuestEventReport(GuestEvent.POWERED_OFF, "guest-shutdown")
        return None

    async def _vm_powered_off(self) -> bool:
        """After a ``vm``/``shutdown`` event: is the VMM still there, its VM torn down (the
        guest did it), rather than on its way out?"""
        if self.client is None or self._terminated:
            return False
        try:
            info = await self.client.info()
        except HypervisorError:
            return False
        return info.state in POWERED_OFF_STATES

    async def check_finished_meanwhile(self) -> None:
        """After a reattach: did the guest power off or panic while nobody was watching? The
        whole file is read again; its older events are history, not news for Nomad."""
        try:
            events = self.events.read_all()
        except (EventFormatError, OSError) as exc:
            log.warning("cannot read Cloud Hypervisor's events: %s", exc)
            return
        for event in events:
            if not event.is_("vm", "rebooted"):
                await self._handle(event)

    async def _quit(self) -> None:
        self._quitting = True
        if self.client is not None:
            with contextlib.suppress(HypervisorError):
                await self.client.shutdown_vmm()

    async def power_down(self) -> bool:
        """The ACPI power button (``vm.power-button``), which the guest sees, unlike
        ``vm.shutdown``; False when the API does not answer."""
        if self.client is None:
            return False
        try:
            await self.client.power_button()
        except HypervisorError as exc:
            log.warning("ACPI power button request failed: %s", exc)
            return False
        return True

    async def pause(self) -> None:
        """``vm.pause``: CH stops the vCPU threads; the VMM and its devices stay."""
        await self._api("paused").pause()

    async def resume(self) -> None:
        await self._api("resumed").resume()

    async def save_state(self, fd: int, timeout: float) -> int:
        """``vm.snapshot`` of the paused VM into a directory in CH's working directory, packed
        into ``fd`` (``snapshot``); the bytes of guest memory. The VM stays paused."""
        client = self._api("saved")
        directory = await asyncio.to_thread(snapshot.fresh_dir, self.vmm_dir, snapshot.SAVE_DIR)
        try:
            await client.snapshot(snapshot.url(snapshot.SAVE_DIR), timeout)
            return await asyncio.to_thread(snapshot.pack, directory, fd)
        finally:
            await asyncio.to_thread(snapshot.remove_dir, directory)

    async def is_paused(self) -> bool:
        """``vm.info`` says ``Paused``. A guest power-off leaves ``Created``/``Shutdown``
        (POWERED_OFF_STATES), so a user's pause is never read as the guest's end."""
        if self.client is None:
            return False
        return (await self.client.info()).state is VmState.PAUSED

    async def describe(self) -> VMDescription:
        """From ``vm.info``: CH runs on KVM only; its disks are opened by path."""
        if self.client is None:
            raise HypervisorError("the API is unavailable, so the VM cannot be described")
        info = await self.client.info()
        config = info.config
        disks = tuple(
            DiskView(
                name=d.id or f"disk{i}",
                file=file_behind(d.path, self.process.ident.pid),
                read_only=d.readonly,
                format=d.image_type.value.lower() if d.image_type else "",
            )
            for i, d in enumerate(config.disks or ())
        )
        size = config.memory.size if config.memory else 0
        return VMDescription(
            accelerator="kvm",
            vcpus=config.cpus.boot_vcpus if config.cpus else 1,
            memory_bytes=size,
            # vm.resize grows a running VM's memory: the actual size beyond the configured one.
            plugged_memory_bytes=max(0, (info.memory_actual_size or size) - size),
            disks=disks,
        )

    @property
    def vmm_dir(self) -> Path:
        return self.runtime_dir / VMM_DIR

    def _api(self, what: str) -> ChClient:
        if self.client is None:
            raise HypervisorError(f"the API is unavailable, so the VM cannot be {what}")
        if self.guest_end is not None:
            raise HypervisorError(f"the guest has ended (guest {self.guest_end})")
        return self.client

    async def terminate(self, grace: float) -> None:
        self._terminated = True
        await self.process.terminate(grace)

    def guest_verdict(self) -> str | None:
        return self.guest_end

    def vmm_exit(self, ended: VMExit) -> VMExit:
        if self._terminated and not ended.signal:
            # CH exits 0 on SIGTERM: the signal we sent is how it ended.
            return VMExit(None, signal.SIGTERM, "Cloud Hypervisor was terminated by SIGTERM")
        if ended.signal or ended.code:
            tail = self.log_spot.tail()
            return VMExit(
                ended.code, ended.signal, f"{ended.reason}: {tail}" if tail else ended.reason
            )
        if ended.code == 0:
            return VMExit(
                None,
                None,
                "Cloud Hypervisor exited without the guest powering off (SIGTERM or vmm.shutdown "
                "from outside the plugin)",
            )
        return ended

    async def guest_memory_used(self) -> int | None:
        """None: CH's balloon has no statistics queue, so the guest's own count is unknown.
        What CH's API says of the balloon is ``vm.info``'s ``memory_actual_size``, the guest's
        memory less what the balloon holds: with our balloon of size 0, the configured size,
        not a usage. The balloon's use here is ``free_page_reporting``: pages the guest frees
        go back to the host, so the VMM's RSS (measured) follows what the guest really holds,
        and ``deflate_on_oom`` lets the guest take back anything ballooned when it runs out."""
        return None

    async def device_io(self) -> Mapping[str, Mapping[str, int]]:
        """``vm.counters``: each device's I/O counters by the ids we gave (disk0, seed,
        net0, ...); empty when the API does not answer (the VM is not running)."""
        if self.client is None:
            return {}
        try:
            return await self.client.counters()
        except HypervisorError as exc:
            log.debug("no device counters from Cloud Hypervisor: %s", exc)
            return {}

    def guest_agent(self) -> GuestAgent | None:
        """qemu-ga on vsock port AGENT_PORT in the guest (the seed starts it there), through
        the hybrid-vsock socket CH binds at vm.boot; None before that socket exists."""
        socket = self.vmm_dir / VSOCK_SOCKET
        return GuestAgent(socket, vsock_port=AGENT_PORT) if socket.exists() else None

    def console_socket(self) -> Path | None:
        """None: the serial console is the VMM's stdout (the task's stdout), output only. CH's
        ``--serial socket=`` would serve it read-write, but then its output reaches the logs
        only while a client relays it, and no CH guest could be run here to verify it."""
        return None

    async def open_terminal(self) -> TerminalPort:
        raise Unsupported(
            "Cloud Hypervisor VMs have no virtio-serial ports to add for an interactive session "
            "(exec without a terminal works through the guest agent)"
        )

    async def close_terminal(self, port: TerminalPort) -> None:
        return None

    async def close(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.cancel()
        if self.client is not None:
            await self.client.close()
        self.process.close()
        for helper in self.helpers:
            helper.close()


def file_behind(path: str, pid: int) -> str:
    """The host file behind a path CH was given: ``/proc/self/fd/N`` (CH runs as vm_user and
    opens its files through descriptors it inherited) is that descriptor's target in CH's
    own /proc entry, read as root like the plugin; any other path is itself."""
    match = PROC_SELF_FD.fullmatch(path)
    if match is None:
        return path
    try:
        return os.readlink(f"/proc/{pid}/fd/{match.group(1)}")
    except OSError:
        return path
