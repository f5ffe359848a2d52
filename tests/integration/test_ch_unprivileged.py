"""Cloud Hypervisor and its virtiofsd run as the unprivileged ``vm_user`` with no_new_privs and
no capabilities, as QEMU does (test_unprivileged_vmm.py), and CH reaches what it needs without
any access to the task's runtime directory (root's, 0700): its API socket and event file are
descriptors, the task's disk and seed are reopened through ``/proc/self/fd/N`` (the files made
vm_user's), the overlay's base through the descriptor its header now names, the shares'
sockets in its own working directory. The VMM is the fake executable, run by the backend
exactly as CH would be (tests/fakes/cloud_hypervisor.py: it opens the disks and payload files
by the names it is given, as vm_user, and serves a hybrid vsock with a simulated qemu-ga
behind it): a test of our launch, not proof of CH. That CH then
installs its own seccomp filter is CH's doing (``--seccomp true`` on its command line is ours).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import stat
import subprocess
from pathlib import Path

import psutil
import pytest

from nomad_vm.driver.driver import VMDriver
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.types import TaskConfig, TaskResources
from nomad_vm.storage import qemu_img
from nomad_vm.storage.tools import find_qemu_img
from nomad_vm.vm.cloud_hypervisor.vm_config import AGENT_PORT
from nomad_vm.vm.registry import BUILT_IN, HypervisorRegistry
from tests.conftest import processes_under, wait_until
from tests.fakes.cloud_hypervisor import wrapper
from tests.integration.test_unprivileged_vmm import VM_USER, assert_unprivileged

pytestmark = pytest.mark.integration

CH = "cloud-hypervisor"


def _driver(root: Path, images: Path) -> VMDriver:
    driver = VMDriver(backends=HypervisorRegistry(BUILT_IN, default="qemu"))
    driver.set_config(
        {
            "data_dir": str(root / "data"),
            "image_paths": [str(images)],
            "hypervisor": CH,
            "cloud_hypervisor": {"bin": str(wrapper(root / CH)), "trust_kvm": True},
        },
        None,
    )
    return driver


def _task(root: Path, images: Path) -> TaskConfig:
    alloc = root / "alloc"
    (alloc / "alloc" / "logs").mkdir(parents=True)
    (alloc / "vm" / "local").mkdir(parents=True)
    console = alloc / "alloc" / "logs" / "vm.stdout"
    console.touch()
    # Nomad's allocation directory is root's alone: nothing under it is reached by path.
    alloc.chmod(0o700)
    return TaskConfig(
        id="a/vm/1",
        name="vm",
        alloc_id="a",
        alloc_dir=str(alloc),
        stdout_path=str(console),
        stderr_path="",
        resources=TaskResources(cpu_mhz=500, memory_mb=128),
        driver_config={
            "image": str(images / "base.qcow2"),
            "kernel": str(images / "vmlinux"),
            # The simulated guest's qemu-ga listens on the agent's vsock port (the seed's unit).
            "cmdline": f"console=ttyS0 fake.agent_vsock={AGENT_PORT}",
            # `nomad alloc signal` goes to this unit through the agent.
            "signal_unit": "app.service",
        },
    )


def _fd_targets(pid: int) -> dict[str, str]:
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return fds


def test_ch_and_virtiofsd_run_unprivileged_and_reach_their_files_by_descriptor(
    short_tmp: Path,
) -> None:
    images = short_tmp / "images"
    images.mkdir()
    (images / "vmlinux").write_bytes(b"\0" * 512)
    base = images / "base.qcow2"
    qemu_img.create(find_qemu_img(), base, "qcow2", 64 * 2**20, falloc=False)
    base.chmod(0o644)
    driver = _driver(short_tmp, images)
    task = _task(short_tmp, images)
    account = pwd.getpwnam(VM_USER)

    async def scenario() -> None:
        await driver.start_task(task)
        journal = JournalStore(short_tmp / "data").load(task.id)
        assert journal is not None and journal.vmm is not None
        runtime = Path(journal.runtime_dir)
        console = Path(task.stdout_path)
        assert wait_until(lambda: b"booted" in console.read_bytes(), 30)
        ch = psutil.Process(journal.vmm.pid)
        # No seccomp filter of its own in the fake; CH is told to install one.
        assert_unprivileged(ch.pid, seccomp="0")
        argv = ch.cmdline()
        assert argv[argv.index("--seccomp") + 1] == "true"
        assert argv[argv.index("--api-socket") + 1].startswith("fd=")
        assert argv[argv.index("--event-monitor") + 1].startswith("fd=")
        daemons = processes_under(short_tmp, "virtiofsd")
        assert daemons, "the task's directories are shared over virtio-fs"
        for daemon in daemons:
            assert_unprivileged(daemon.pid, seccomp="2")  # virtiofsd's own filter

        # The runtime dir stays root's; CH works in the directory it owns.
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o700 and runtime.stat().st_uid == 0
        vmm_dir = Path(os.readlink(f"/proc/{ch.pid}/cwd"))
        assert vmm_dir == runtime / "vmm"
        assert (vmm_dir.stat().st_uid, stat.S_IMODE(vmm_dir.stat().st_mode)) == (
            account.pw_uid,
            0o700,
        )
        # The task's disk and seed: vm_user's, 0600, held by CH through the names it was given.
        held = _fd_targets(ch.pid)
        disk = runtime / "disk.qcow2"
        for own in (disk, runtime / "cidata.iso"):
            st = own.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (account.pw_uid, 0o600), own
            assert str(own) in held.values(), held
        # The overlay names its base as the descriptor CH inherited, which is the base image.
        info = subprocess.run(
            [str(find_qemu_img()), "info", "-U", "--output=json", str(disk)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        backing = json.loads(info)["backing-filename"]
        assert backing.startswith("/proc/self/fd/")
        assert held[backing.rsplit("/", 1)[1]] == str(base)
        # The API socket and the event file are descriptors; the plugin finds them by path.
        assert (runtime / "ch-api.sock").exists()
        assert (runtime / "ch-events.json").read_text().count('"booted"') == 1

        # Stats: the VMM's CPU and RSS; each device's I/O from vm.counters, which Nomad's
        # TaskStats has no field for, in InspectTask's attributes.
        stats = driver.task_stats(task.id, 0.1)
        sample = await anext(stats)
        await stats.aclose()
        assert sample.memory.rss > 0 and sample.memory.measured == ("RSS",)
        attributes = (await driver.inspect_task(task.id)).attributes
        assert attributes["io.disk0.read_bytes"] == "4096"
        assert attributes["io.seed.read_ops"] == "1"
        # The guest agent over vsock: CH (as vm_user) bound its hybrid-vsock socket in its
        # own directory; the plugin's exec goes through the CONNECT handshake to the agent.
        vsock = vmm_dir / "vsock.sock"
        assert vsock.stat().st_uid == account.pw_uid
        outcome = await driver.exec_task(task.id, ["hostname", "-f"], 10)
        assert (outcome.exit_code, outcome.stdout) == (0, b"fake guest ran: hostname -f\n")
        # A signal other than SIGTERM/SIGINT reaches the task's unit through the same agent.
        await driver.signal_task(task.id, "SIGHUP")
        sent = b"fake guest agent: systemctl kill --signal=SIGHUP -- app.service"
        assert sent in console.read_bytes()
        pids.append(ch.pid)
        await driver.stop_task(task.id, 10, "SIGTERM")
        result = await driver.wait_task(task.id)
        await driver.destroy_task(task.id, force=False)
        assert (result.exit_code, result.err) == (0, ""), result

    pids: list[int] = []
    asyncio.run(scenario())
    (ch_pid,) = pids
    assert not psutil.pid_exists(ch_pid) or psutil.Process(ch_pid).status() == "zombie"
    assert not processes_under(short_tmp, "virtiofsd")
    assert JournalStore(short_tmp / "data").load(task.id) is None
