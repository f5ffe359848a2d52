"""The serial console, read-write, through the real plugin process and a real QEMU (TCG).

The tiny guest runs no guest agent: its console shell is reached through the serial port alone,
as a rescue session would be. Its /init runs ``busybox sh`` on ttyS0 here, so what the test types
is executed and the result shows on the console: in each attached session and in the task's
stdout (the FIFO that Nomad's logmon reads), at the same time.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from nomad_vm.driver.console_session import CONSOLE_COMMAND
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under
from tests.integration.console_session import StreamingSession
from tests.integration.pluginkit import DRIVER, configure, drv, tiny_task
from tests.integration.test_recovery import recover
from tests.integration.test_vm_lifecycle import destroy, stop, wait

pytestmark = pytest.mark.integration

READY = b"console-shell-ready"
# An interactive shell on the serial line, as a getty's login shell would be.
SHELL = "echo console-shell-ready; exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1"
CTRL_RBRACKET = b"\x1d"


def attach(plugin: PluginProcess, task_id: str, *, tty: bool = True) -> StreamingSession:
    session = StreamingSession(plugin, task_id, [CONSOLE_COMMAND], tty=tty)
    assert session.wait_for(b"attached to the serial console", 30), session.text()
    return session


def test_console_read_write_with_logs_detach_and_plugin_restart(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    try:
        with tiny_task(first, short_tmp, tiny_guest, alloc_name="con", run=SHELL) as (
            cfg,
            fifo,
            _,
        ):
            resp = drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
            assert fifo.wait_for(READY, 120), bytes(fifo.data)
            (qemu,) = qemu_processes_under(short_tmp / "con")

            # Input reaches the guest; its output reaches the session and the task's stdout.
            one = attach(first, cfg.id)
            one.type(b"echo serial-$((6*7))-ok\r")
            assert one.wait_for(b"serial-42-ok", 60), one.text()
            assert fifo.wait_for(b"serial-42-ok", 30), bytes(fifo.data[-2000:])

            # A second session at the same time (without a tty): shared input, both see all.
            two = attach(first, cfg.id, tty=False)
            two.type(b"echo both-$((40+2))\r")
            assert two.wait_for(b"both-42", 60), two.text()
            assert one.wait_for(b"both-42", 30), one.text()

            # Ctrl-] detaches the first session only; what preceded it on the line is sent.
            one.type(b"echo before-detach-$((1+1))" + CTRL_RBRACKET)
            assert one.wait_exit(30) == 0, one.text()
            assert "detached from the serial console" in one.text()
            two.type(b"\r")
            assert two.wait_for(b"before-detach-2", 60), two.text()

            # The client going away ends that session; the VM is untouched.
            two.hang_up()
            assert two.wait_exit(30) == 0, two.text()
            assert qemu.is_running()

            # Arguments are refused clearly, like a command that cannot run (exit 126).
            refused = StreamingSession(first, cfg.id, [CONSOLE_COMMAND, "extra"])
            assert refused.wait_exit(30) == 126, refused.text()
            assert "takes no arguments" in refused.text()

            # The plugin dies with a session attached; guest output written meanwhile still
            # reaches the task's stdout (QEMU writes that copy itself).
            three = attach(first, cfg.id)
            three.type(b"(sleep 3; echo while-away-$((3*3))) &\r")
            # The guest's echo of the line: it has the command before the plugin dies.
            assert three.wait_for(b"while-away-$((3*3))) &", 30), three.text()
            first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            first.wait_exit(5)
            assert fifo.wait_for(b"while-away-9", 60), bytes(fifo.data[-2000:])
            assert qemu.is_running()

            second = PluginProcess([str(DRIVER)])
            second.start(short_tmp / "plugin2.stderr")
            try:
                configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
                recover(second, resp.handle)
                again = attach(second, cfg.id)
                again.type(b"echo recovered-$((5*5))\r")
                assert again.wait_for(b"recovered-25", 60), again.text()
                assert fifo.wait_for(b"recovered-25", 30)

                # Stopping the VM ends an attached session, with the reason.
                stop(second, cfg.id, 10)
                assert wait(second, cfg.id).result.exit_code in (0, 128 + 15)
                assert again.wait_exit(30) == 1, again.text()
                assert "serial console closed" in again.text()
                destroy(second, cfg.id)
            finally:
                second.kill()
    finally:
        first.kill()
    assert not qemu_processes_under(short_tmp)
