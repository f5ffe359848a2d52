"""What the conformance suite needs to know about each backend: how to ask its guest to behave
(run, ignore the power button, power off, panic, reboot), how to tell it has booted or acted
while no plugin watched, and which of its processes are still alive.

QEMU runs the tiny test guest under TCG (its init reads ``nomadvm.run`` and
``nomadvm.ignore_acpi``); the fake simulates the same guest from its own command-line words.
Both boot the same kernel and initramfs paths, which the driver validates either way.

Cloud Hypervisor comes twice. ``CH_FAKE_VMM``: the real backend (its launch, API client, event
file, verdicts, recovery) driving ``tests/fakes/cloud_hypervisor.py``, a fake VMM that serves
CH's API and writes its events and simulates the guest like the fake: a test of our code, not
of CH. ``CH``: a real ``cloud-hypervisor`` (NOMAD_VM_TEST_CH_BIN) booting the tiny guest, which
needs a KVM that runs guests; ``ch_unavailable`` says precisely why it cannot run otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from nomad_vm.driver.checkpoints import START_STEPS
from nomad_vm.driver.driver import VMDriver
from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.snapshot_seal import KEY_FILE
from nomad_vm.driver.types import TaskConfig, TaskResources
from nomad_vm.errors import HypervisorError
from nomad_vm.guests.tiny import tiny_cmdline
from nomad_vm.vm.accel import probe_kvm
from nomad_vm.vm.capabilities import HypervisorCapabilities
from nomad_vm.vm.cloud_hypervisor.events import EventFile
from nomad_vm.vm.cloud_hypervisor.files import EVENTS_FILE
from nomad_vm.vm.registry import BUILT_IN, HypervisorRegistry
from tests.conftest import processes_under, vm_processes_under
from tests.fakes import hypervisor as fake
from tests.fakes.cloud_hypervisor import FAKE_CH, wrapper

CH = "cloud-hypervisor"
CH_FAKE_VMM = "cloud-hypervisor+fake-vmm"
CH_BIN = "NOMAD_VM_TEST_CH_BIN"
# The fake VMM's console line once its guest "booted".
CH_FAKE_BOOTED = b"fake cloud-hypervisor guest: booted"


def ch_unavailable() -> str:
    """Why the real Cloud Hypervisor kit cannot run here; "" when it can."""
    binary = os.environ.get(CH_BIN, "")
    kvm = probe_kvm()
    problems = []
    if not binary:
        problems.append(
            f"{CH_BIN} names no cloud-hypervisor binary (no package reachable from this host "
            "ships one)"
        )
    elif not os.access(binary, os.X_OK):
        problems.append(f"{CH_BIN}={binary} is not an executable")
    if not kvm.usable:
        problems.append(
            f"KVM cannot run guests here, and Cloud Hypervisor has no emulation: {kvm.reason}"
        )
    return "; ".join(problems)


RUNNING = b"nomad-vm tiny guest: running"
# The tiny guest's counter (Behaviour.counts): its shell keeps N in memory.
COUNTER = 'i=0; while true; do i=$((i+1)); echo "count $i"; sleep 0.2; done'
BOOTED = b"nomad-vm tiny guest: booted"
BOOT_TIMEOUT = 180.0
# While no plugin watches, the guest acts this long after boot (QEMU: the tiny guest's sleep).
QEMU_ACT_LATER = 6
ALLOC_ID = "a1b2c3d4-0000-0000-0000-000000000001"


@dataclass(frozen=True)
class Behaviour:
    ignores_acpi: bool = False
    # What the guest does by itself: "" (keeps running), "poweroff", "panic" or "reboot".
    then: str = ""
    # Only later: long enough for the test to send the plugin away first.
    later: bool = False
    # Prints "count N" on its console every 0.2 s, N kept in guest memory (snapshots).
    counts: bool = False


RUNS = Behaviour()


@dataclass
class Kit:
    """A backend under test, in a private root directory."""

    name: str
    root: Path
    guest: Any  # tests' TinyGuest
    host: fake.FakeHost = field(default_factory=fake.FakeHost)

    # -- the plugin --------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def is_ch(self) -> bool:
        return self.name in (CH, CH_FAKE_VMM)

    @property
    def simulated_guest(self) -> bool:
        """The guest acts from the fakes' command-line words (fake.then=...)."""
        return self.name in (fake.NAME, CH_FAKE_VMM)

    def registry(self) -> HypervisorRegistry:
        if self.name == fake.NAME:
            return fake.registry(self.host)
        if self.is_ch:
            return HypervisorRegistry(BUILT_IN, default=CH)
        return HypervisorRegistry()

    def _ch_block(self) -> dict[str, object]:
        if self.name == CH_FAKE_VMM:
            (self.root / "bin").mkdir(exist_ok=True)
            # The fake VMM needs no KVM; the backend is told to trust it, as an operator may.
            return {"bin": str(wrapper(self.root / "bin" / CH)), "trust_kvm": True}
        return {"bin": os.environ[CH_BIN]}

    @property
    def start_steps(self) -> tuple[str, ...]:
        """The StartTask steps the every-step task takes with this backend: CH boots the
        kernel directly and keeps no UEFI variable store."""
        steps = tuple(s for s in START_STEPS if s != "network")
        return tuple(s for s in steps if s != "firmware-vars") if self.is_ch else steps

    @property
    def capabilities(self) -> HypervisorCapabilities:
        return self.registry().default().capabilities

    def driver(self, **kwargs: Any) -> VMDriver:
        """A fresh plugin (as after a restart), configured as Nomad would."""
        driver = VMDriver(backends=self.registry(), **kwargs)
        paths = [str(self.guest.vmlinux.parent), str(self.images)]
        config: dict[str, object] = {"data_dir": str(self.data_dir), "image_paths": paths}
        if self.is_ch:
            config.update(hypervisor=CH, cloud_hypervisor=self._ch_block())
        driver.set_config(config, None)
        return driver

    # -- tasks ---------------------------------------------------------------------------------

    def task(
        self, name: str, behaviour: Behaviour = RUNS, options: dict[str, object] | None = None
    ) -> TaskConfig:
        config: dict[str, object] = {
            "kernel": str(self.guest.vmlinux),
            "initramfs": str(self.guest.initramfs),
            "cmdline": self._cmdline(behaviour),
            **(options or {}),
        }
        return tiny_task_config(self.root / name, ALLOC_ID, name, config)

    def every_step(self) -> dict[str, object]:
        """Task options that make StartTask take every step it can without a network: a disk
        (and so a cloud-init seed), UEFI (its variable store) and shares (helper processes)."""
        self.images.mkdir(exist_ok=True)
        image = self.images / "disk.raw"
        if not image.exists():
            with open(image, "wb") as f:
                f.truncate(16 * 1024 * 1024)
        if self.is_ch:
            return {"image": str(image)}
        return {"image": str(image), "firmware": "uefi"}

    def _cmdline(self, behaviour: Behaviour) -> str:
        if self.simulated_guest:
            after = 3600.0 if behaviour.later else 0.0  # later: when the test says (act_now)
            words = fake.tokens(behaviour.ignores_acpi, behaviour.then, after)
            if behaviour.counts:
                words += " fake.count=1"
            return f"{self.guest.cmdline} {words}".strip()
        deaf = " nomadvm.ignore_acpi=1" if behaviour.ignores_acpi else ""
        base: str = self.guest.cmdline + deaf
        run = {"poweroff": "true", "panic": "echo c > /proc/sysrq-trigger", "reboot": "reboot -f"}
        if behaviour.counts:
            return tiny_cmdline(base, COUNTER)
        if not behaviour.then:
            return base
        command = run[behaviour.then]
        if behaviour.later:
            command = f"sleep {QEMU_ACT_LATER}; {command}"
        return tiny_cmdline(base, command)

    # -- what the guest did ----------------------------------------------------------------

    async def booted(self, task: TaskConfig, marker: bytes = RUNNING) -> None:
        """The guest is up (and watches its power button). The fake's is at once."""
        if self.name == fake.NAME:
            return
        if self.name == CH_FAKE_VMM:
            marker = CH_FAKE_BOOTED
        console = Path(task.stdout_path)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while marker not in console.read_bytes():
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker!r} not on the console: {console.read_bytes()!r}")
            await asyncio.sleep(0.1)

    def boots(self, task: TaskConfig) -> int | None:
        """How often the guest booted, from its console; None for the in-process fake (it
        counts launches instead: ``host.launches``)."""
        if self.name == fake.NAME:
            return None
        marker = CH_FAKE_BOOTED if self.name == CH_FAKE_VMM else BOOTED
        return Path(task.stdout_path).read_bytes().count(marker)

    async def acted_while_away(self, journal: TaskJournal) -> None:
        """The guest's act (power-off or panic) has happened while no plugin watched."""
        vmm = journal.vmm
        assert vmm is not None
        if self.name == fake.NAME:
            self.host.act_now(vmm)
            return
        if self.is_ch:
            if self.name == CH_FAKE_VMM:
                os.kill(vmm.pid, signal.SIGUSR1)
            await self._ch_acted(Path(journal.control_socket).parent / EVENTS_FILE)
            return
        from nomad_vm.vm.qemu.monitor import QemuMonitor

        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            monitor = QemuMonitor(Path(journal.control_socket))
            try:
                await monitor.connect()
                if await monitor.status() in ("shutdown", "guest-panicked"):
                    return
            except HypervisorError:
                pass
            finally:
                await monitor.close()
            if time.monotonic() > deadline:
                raise AssertionError("the guest never acted")
            await asyncio.sleep(0.2)

    async def _ch_acted(self, events: Path) -> None:
        """CH's event file shows the guest's power-off or panic."""
        reader = EventFile(events)
        seen = []
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not any(e.is_("vm", "shutdown") or e.is_("guest", "panic") for e in seen):
            if time.monotonic() > deadline:
                raise AssertionError(f"the guest never acted: {seen}")
            await asyncio.sleep(0.05)
            seen += reader.read_new()

    # -- what is left --------------------------------------------------------------------------

    def live_processes(self) -> list[psutil.Process]:
        """Processes of this backend still running for the test's tasks."""
        if self.is_ch:
            # At its gate the VMM is a shell naming the wrapper (.../cloud-hypervisor); once
            # released, the fake's Python names its module.
            found = {p.pid: p for p in processes_under(self.root, CH)}
            found.update((p.pid, p) for p in processes_under(self.root, FAKE_CH))
            found.update((p.pid, p) for p in processes_under(self.root, "virtiofsd"))
            return list(found.values())
        if self.name != fake.NAME:
            return vm_processes_under(self.root)
        found = []
        for ident in self.host.alive():
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(ident.pid))
        return found

    def processes(self) -> list[str]:
        described = []
        for proc in self.live_processes():
            with contextlib.suppress(psutil.Error):
                described.append(f"{proc.pid}: {' '.join(proc.cmdline()[:4])}")
        return described

    def files(self, task: TaskConfig, runtime_dir: Path | None = None) -> list[str]:
        """Files of the plugin's (journal, runtime dirs) still there; [] when clean."""
        left = [str(p) for p in self.data_dir.rglob("*")] if self.data_dir.exists() else []
        # The node's snapshot key is the plugin's, made once for every task's snapshots.
        left = [p for p in left if p != str(self.data_dir / KEY_FILE)]
        if runtime_dir is not None and runtime_dir.exists():
            left.append(str(runtime_dir))
        task_dir = Path(task.task_dir)
        left += [str(p) for p in task_dir.glob("nomad-vm-*")]
        return left


def tiny_task_config(
    alloc: Path, alloc_id: str, name: str, driver_config: dict[str, object]
) -> TaskConfig:
    """A task "tiny" of allocation ``alloc_id`` in the allocation dir ``alloc`` (made, with the
    task's local/secrets dirs and its console file), as Nomad's TaskConfig would say it."""
    for sub in ("alloc/logs", "tiny/local", "tiny/secrets"):
        (alloc / sub).mkdir(parents=True, exist_ok=True)
    console = alloc / "alloc" / "logs" / "tiny.stdout"
    console.touch()
    return TaskConfig(
        id=f"{alloc_id}/tiny/{name}",
        name="tiny",
        alloc_id=alloc_id,
        alloc_dir=str(alloc),
        stdout_path=str(console),
        stderr_path="",
        resources=TaskResources(cpu_mhz=500, memory_mb=160),
        driver_config=driver_config,
    )
