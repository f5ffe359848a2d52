"""The guest agent client against a real qemu-ga: the cached Debian guest under TCG (one VM for
the whole module, on a throwaway overlay), and the tiny guest, whose port nobody opens.

Timings are printed (``pytest -s``): the agent answers 20-45 s after QEMU starts on a quiet
host; other VMs on the same cores can double that, hence the generous limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nomad_vm.guests.tiny import TinyGuest
from nomad_vm.vm.guest_agent import (
    NO_AGENT,
    AgentCommandError,
    AgentTimeout,
    AgentUnavailable,
    GuestAgent,
)
from nomad_vm.vm.qemu.agent_channel import agent_argv

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"
# fmt: off
QEMU_ARGS = (
    "-accel", "tcg", "-machine", "pc", "-nodefaults", "-vga", "none", "-no-reboot",
    "-smp", "1", "-display", "none",
)
# fmt: on
AGENT_READY_TIMEOUT = 240.0
MIB = 2**20


@dataclass
class VM:
    process: subprocess.Popen[bytes]
    socket: Path
    console: Path
    started: float

    def console_tail(self) -> str:
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return "\n".join(text.splitlines()[-40:])


@contextlib.contextmanager
def qemu(tmp: Path, *args: str) -> Iterator[VM]:
    """QEMU with the agent port on ``tmp/qga.sock`` and the serial console in a file."""
    vm_socket, console = tmp / "qga.sock", tmp / "console.log"
    argv = [QEMU, *QEMU_ARGS, "-serial", f"file:{console}", *agent_argv(vm_socket), *args]
    with (tmp / "qemu.log").open("wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    vm = VM(process, vm_socket, console, time.monotonic())
    try:
        # QEMU creates the socket and the console file one after the other: wait for both.
        while not (vm_socket.exists() and console.exists()):
            if process.poll() is not None or time.monotonic() - vm.started > 30:
                log = (tmp / "qemu.log").read_text()
                pytest.fail(f"QEMU did not create {vm_socket} and {console}: {log}")
            time.sleep(0.05)
        yield vm
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def debian_vm(debian_guest) -> Iterator[VM]:  # type: ignore[no-untyped-def]
    guest = debian_guest
    tmp = Path(tempfile.mkdtemp(prefix="nvt-", dir="/tmp"))
    try:
        # A throwaway overlay: the cached disk is never opened read-write.
        overlay = tmp / "overlay.qcow2"
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2"]
        subprocess.run([*create, "-b", str(guest.disk), str(overlay)], check=True)
        disk = ["-drive", f"file={overlay},if=none,id=root,format=qcow2"]
        disk += ["-device", "virtio-blk-pci,drive=root"]
        kernel = ["-kernel", str(guest.vmlinux), "-initrd", str(guest.initrd)]
        with qemu(tmp, "-m", "1024", *disk, *kernel, "-append", guest.cmdline) as vm:
            asyncio.run(wait_for_agent(vm))
            yield vm
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def wait_for_agent(vm: VM) -> None:
    """Ping on ONE connection until the agent answers: the unanswered syncs pile up in the
    channel and are answered all at once when the agent starts, which the client must skip."""
    attempts = 0
    async with GuestAgent(vm.socket) as agent:
        while True:
            attempts += 1
            try:
                await agent.ping(timeout=3.0)
                break
            except AgentUnavailable:
                late = time.monotonic() - vm.started > AGENT_READY_TIMEOUT
                if late or vm.process.poll() is not None:
                    pytest.fail(f"no guest agent after {attempts} pings:\n{vm.console_tail()}")
        ready = time.monotonic() - vm.started
        print(f"\nguest agent answered {ready:.1f} s after QEMU started ({attempts} pings)")
        await agent.info()  # the piled-up replies are all behind us


Body = Callable[[GuestAgent], Awaitable[None]]


def with_agent(vm: VM, body: Body) -> None:
    async def main() -> None:
        async with GuestAgent(vm.socket) as agent:
            await body(agent)

    asyncio.run(main())


async def timed(call: Callable[[], Awaitable[object]], times: int) -> str:
    durations = []
    for _ in range(times):
        started = time.monotonic()
        await call()
        durations.append((time.monotonic() - started) * 1000)
    return f"median {statistics.median(durations):.1f} ms (min {min(durations):.1f})"


def test_ping_and_info(debian_vm: VM) -> None:
    async def body(agent: GuestAgent) -> None:
        info = await agent.info()
        assert info["version"].startswith("7.2")
        enabled = {c["name"] for c in info["supported_commands"] if c["enabled"]}
        assert {"guest-exec", "guest-exec-status", "guest-file-open"} <= enabled
        print(f"\nping: {await timed(agent.ping, 20)}; guest-info: {await timed(agent.info, 5)}")

    with_agent(debian_vm, body)


def test_exec_output_and_exit_code(debian_vm: VM) -> None:
    async def body(agent: GuestAgent) -> None:
        argv = ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"]
        result = await agent.exec(argv, timeout=30)
        assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)
        assert result.signal is None and not result.truncated
        killed = await agent.exec(["/bin/sh", "-c", "kill -TERM $$"], timeout=30)
        assert (killed.exit_code, killed.signal) == (128 + 15, 15)
        with pytest.raises(AgentCommandError, match="No such file"):
            await agent.exec(["/no/such/program"], timeout=30)
        print(f"\nexec true: {await timed(lambda: agent.exec(['true'], timeout=30), 5)}")

    with_agent(debian_vm, body)


def test_exec_stdin(debian_vm: VM) -> None:
    async def body(agent: GuestAgent) -> None:
        data = b"line one\n\x00\xffbinary\n" * 1000
        assert (await agent.exec(["cat"], stdin=data, timeout=30)).stdout == data
        # Without input the child's stdin is /dev/null, so cat cannot hang.
        assert (await agent.exec(["cat"], timeout=30)).stdout == b""

    with_agent(debian_vm, body)


def test_exec_env_replaces_the_environment(debian_vm: VM) -> None:
    async def body(agent: GuestAgent) -> None:
        result = await agent.exec(["env"], env={"GREETING": "hello world"}, timeout=30)
        # Only what was passed: no PATH, no HOME (the program is still found in the agent's PATH).
        assert result.stdout == b"GREETING=hello world\n"
        inherited = await agent.exec(["env"], timeout=30)
        assert b"PATH=" in inherited.stdout

    with_agent(debian_vm, body)


def test_exec_timeout_kills_the_process_tree(debian_vm: VM) -> None:
    async def body(agent: GuestAgent) -> None:
        argv = ["/bin/sh", "-c", "sleep 1000 & sleep 1001; echo never"]
        started = time.monotonic()
        with pytest.raises(AgentTimeout, match="did not exit within 2") as caught:
            await agent.exec(argv, timeout=2)
        elapsed = time.monotonic() - started
        assert caught.value.killed, caught.value
        assert elapsed < 10
        left = await agent.exec(["pgrep", "-f", "^sleep 100[01]$"], timeout=30)
        assert left.exit_code == 1, left  # neither sleep is left running
        print(f"\nexec timeout 2 s: AgentTimeout after {elapsed:.2f} s")

    with_agent(debian_vm, body)


def test_large_output_and_truncation(debian_vm: VM) -> None:
    async def body(agent: GuestAgent) -> None:
        started = time.monotonic()
        script = "yes 0123456789abcdef | head -c 1048576"
        result = await agent.exec(["sh", "-c", script], timeout=60)
        one_mib = time.monotonic() - started
        assert result.stdout == (b"0123456789abcdef\n" * 65536)[:MIB] and not result.truncated
        # qemu-ga keeps at most 16 MiB per stream and drops the rest, saying so.
        started = time.monotonic()
        result = await agent.exec(["head", "-c", str(17 * MIB), "/dev/zero"], timeout=120)
        capped = time.monotonic() - started
        assert result.truncated and result.stdout == bytes(16 * MIB) and result.exit_code == 0
        print(f"\n1 MiB of output: {one_mib:.2f} s; 17 MiB (kept 16): {capped:.2f} s")

    with_agent(debian_vm, body)


def test_file_write_then_read(debian_vm: VM) -> None:
    async def body(agent: GuestAgent) -> None:
        data = os.urandom(3 * MIB + 123)  # several chunks each way
        started = time.monotonic()
        await agent.file_write("/tmp/nomad-vm-agent-test", data)
        wrote = time.monotonic() - started
        started = time.monotonic()
        assert await agent.file_read("/tmp/nomad-vm-agent-test") == data
        read = time.monotonic() - started
        digest = await agent.exec(["sha256sum", "/tmp/nomad-vm-agent-test"], timeout=30)
        assert digest.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
        with pytest.raises(AgentCommandError, match="No such file"):
            await agent.file_read("/tmp/no-such-file")
        print(f"\n3 MiB file: write {wrote:.2f} s, read {read:.2f} s")

    with_agent(debian_vm, body)


def test_partial_command_from_a_previous_client(debian_vm: VM) -> None:
    """A client that left a command half-written: our 0xFF flushes it in the agent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(debian_vm.socket))
        raw.sendall(b'{"execute": "guest-info"}\n{"execute": "guest-exec-status", "argu')

    async def body(agent: GuestAgent) -> None:
        await agent.ping()
        assert (await agent.exec(["echo", "in sync"], timeout=30)).stdout == b"in sync\n"

    with_agent(debian_vm, body)


def test_second_client_waits_for_the_first(debian_vm: VM) -> None:
    """QEMU serves one client at a time: a second one gets no answer, then takes over."""

    async def main() -> None:
        async with GuestAgent(debian_vm.socket) as first, GuestAgent(debian_vm.socket) as second:
            await first.ping()
            with pytest.raises(AgentUnavailable, match=NO_AGENT.replace("?", r"\?")):
                await second.ping(timeout=2)
            await first.close()
            await second.ping(timeout=10)

    asyncio.run(main())


def test_no_agent_in_the_guest(tiny_guest: TinyGuest, short_tmp: Path) -> None:
    """The tiny guest has virtio_console but no agent: calls fail in time, never hang."""
    kernel = ["-kernel", str(tiny_guest.vmlinux), "-initrd", str(tiny_guest.initramfs)]
    with qemu(short_tmp, "-m", "128", *kernel, "-append", tiny_guest.cmdline) as vm:
        while b"nomad-vm tiny guest: running" not in vm.console.read_bytes():
            if time.monotonic() - vm.started > 120 or vm.process.poll() is not None:
                pytest.fail(f"tiny guest did not boot:\n{vm.console_tail()}")
            time.sleep(0.2)

        async def main() -> tuple[float, float]:
            async with GuestAgent(vm.socket, rpc_timeout=2.0) as agent:
                ping = await seconds_to_fail(agent.ping(timeout=3))
                exec_ = await seconds_to_fail(agent.exec(["true"], timeout=1))
            return ping, exec_

        ping, exec_ = asyncio.run(main())
    assert 3 <= ping < 5 and 2 <= exec_ < 4, (ping, exec_)
    print(f"\nno agent: ping failed after {ping:.2f} s, exec after {exec_:.2f} s")


async def seconds_to_fail(call: Awaitable[object]) -> float:
    started = time.monotonic()
    with pytest.raises(AgentUnavailable, match="is qemu-guest-agent installed"):
        await call
    return time.monotonic() - started
