"""What the conformance suite needs to know about each backend: how to ask its guest to behave
(run, ignore the power button, power off, panic, reboot), how to tell it has booted or acted
while no plugin watched, and which of its processes are still alive.

QEMU runs the tiny test guest under TCG (its init reads ``nomadvm.run`` and
``nomadvm.ignore_acpi``); the fake simulates the same guest from its own command-line words.
Both boot the same kernel and initramfs paths, which the driver validates either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from nomad_vm.driver.driver import VMDriver
from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.types import TaskConfig, TaskResources
from nomad_vm.errors import HypervisorError
from nomad_vm.guests.tiny import tiny_cmdline
from nomad_vm.vm.hypervisor import HypervisorCapabilities
from nomad_vm.vm.registry import HypervisorRegistry
from tests.conftest import vm_processes_under
from tests.fakes import hypervisor as fake

RUNNING = b"nomad-vm tiny guest: running"
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

    def registry(self) -> HypervisorRegistry:
        if self.name == fake.NAME:
            return fake.registry(self.host)
        return HypervisorRegistry()

    @property
    def capabilities(self) -> HypervisorCapabilities:
        return self.registry().default().capabilities

    def driver(self, **kwargs: Any) -> VMDriver:
        """A fresh plugin (as after a restart), configured as Nomad would."""
        driver = VMDriver(backends=self.registry(), **kwargs)
        paths = [str(self.guest.vmlinux.parent), str(self.images)]
        driver.set_config({"data_dir": str(self.data_dir), "image_paths": paths}, None)
        return driver

    # -- tasks ---------------------------------------------------------------------------------

    def task(
        self, name: str, behaviour: Behaviour = RUNS, options: dict[str, object] | None = None
    ) -> TaskConfig:
        alloc = self.root / name
        for sub in ("alloc/logs", "tiny/local", "tiny/secrets"):
            (alloc / sub).mkdir(parents=True, exist_ok=True)
        console = alloc / "alloc" / "logs" / "tiny.stdout"
        console.touch()
        config: dict[str, object] = {
            "kernel": str(self.guest.vmlinux),
            "initramfs": str(self.guest.initramfs),
            "cmdline": self._cmdline(behaviour),
            **(options or {}),
        }
        return TaskConfig(
            id=f"{ALLOC_ID}/tiny/{name}",
            name="tiny",
            alloc_id=ALLOC_ID,
            alloc_dir=str(alloc),
            stdout_path=str(console),
            stderr_path="",
            resources=TaskResources(cpu_mhz=500, memory_mb=160),
            driver_config=config,
        )

    def every_step(self) -> dict[str, object]:
        """Task options that make StartTask take every step it can without a network: a disk
        (and so a cloud-init seed), UEFI (its variable store) and shares (helper processes)."""
        self.images.mkdir(exist_ok=True)
        image = self.images / "disk.raw"
        if not image.exists():
            with open(image, "wb") as f:
                f.truncate(16 * 1024 * 1024)
        return {"image": str(image), "firmware": "uefi"}

    def _cmdline(self, behaviour: Behaviour) -> str:
        if self.name == fake.NAME:
            after = 3600.0 if behaviour.later else 0.0  # later: when the test says (act_now)
            words = fake.tokens(behaviour.ignores_acpi, behaviour.then, after)
            return f"{self.guest.cmdline} {words}".strip()
        deaf = " nomadvm.ignore_acpi=1" if behaviour.ignores_acpi else ""
        base: str = self.guest.cmdline + deaf
        run = {"poweroff": "true", "panic": "echo c > /proc/sysrq-trigger", "reboot": "reboot -f"}
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
        console = Path(task.stdout_path)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while marker not in console.read_bytes():
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker!r} not on the console: {console.read_bytes()!r}")
            await asyncio.sleep(0.1)

    async def acted_while_away(self, journal: TaskJournal) -> None:
        """The guest's act (power-off or panic) has happened while no plugin watched."""
        vmm = journal.vmm
        assert vmm is not None
        if self.name == fake.NAME:
            self.host.act_now(vmm)
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

    # -- what is left --------------------------------------------------------------------------

    def live_processes(self) -> list[psutil.Process]:
        """Processes of this backend still running for the test's tasks."""
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
        if runtime_dir is not None and runtime_dir.exists():
            left.append(str(runtime_dir))
        task_dir = Path(task.task_dir)
        left += [str(p) for p in task_dir.glob("nomad-vm-*")]
        return left
