"""virtiofsd through the real plugin: which daemon is used, what a failing one says, and that
no daemon outlives its task on any path (stop, plugin restart, VM killed, cancelled start; a
start QEMU fails is test_plugin_process.py's, whose leak check counts virtiofsd too)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import psutil
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import processes_under, qemu_processes_under
from tests.integration.pluginkit import DRIVER, configure, drv, tiny_task
from tests.integration.test_recovery import recover
from tests.integration.test_vm_lifecycle import (
    RUNNING,
    collect_events,
    destroy,
    stop,
    wait,
    wait_until,
)
from tests.unit.test_virtiofsd import RUST_DAEMON, write_daemon

# Debian 12's qemu-system-common puts QEMU's legacy C virtiofsd here, off PATH.
LEGACY_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
# What a Nomad agent started by systemd or by hand on Debian has: no .tools/bin, no venv.
ORDINARY_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def daemons_under(path: Path) -> list[psutil.Process]:
    return processes_under(path, "virtiofsd")


def all_gone(procs: list[psutil.Process], timeout: float = 15.0) -> list[psutil.Process]:
    """Wait for these processes to end (a daemon ends when QEMU closes its socket); the ones
    still alive after ``timeout``."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def fingerprint_attributes(plugin: PluginProcess) -> dict[str, str]:
    stream = drv(plugin).Fingerprint(driver_pb2.FingerprintRequest())
    first = next(iter(stream))
    stream.cancel()
    return {k: v.string_val for k, v in first.attributes.items() if v.string_val}


def test_a_daemon_that_fails_is_quoted_instead_of_connection_refused(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """It passes the option check, then exits at once with a message (as the legacy daemon does
    with options it does not know): the error is its message, and nothing is left."""
    failing = RUST_DAEMON.replace(
        "*) printf",
        '--fd=*) echo "fake virtiofsd: cannot enter the sandbox" >&2; exit 1 ;;\n*) printf',
    )
    fake = write_daemon(short_tmp / "bin" / "virtiofsd", failing)
    with (
        tiny_task(
            plugin,
            short_tmp,
            tiny_guest,
            alloc_name="fails",
            plugin_options={"virtiofsd_binary": str(fake)},
        ) as (cfg, _, alloc),
        pytest.raises(grpc.RpcError) as err,
    ):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
    message = err.value.details() or ""
    assert "fake virtiofsd: cannot enter the sandbox" in message, message
    assert "exited with status 1 before QEMU connected" in message, message
    assert "Connection refused" not in message, message
    assert not qemu_processes_under(short_tmp) and not daemons_under(short_tmp)
    assert not list((alloc / "tiny").iterdir()), "the runtime dir was left behind"


@pytest.mark.skipif(not LEGACY_VIRTIOFSD.exists(), reason="no legacy C virtiofsd on this host")
def test_with_debians_legacy_virtiofsd_the_vm_starts_over_9p_and_says_why(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The README's install path: an agent with an ordinary PATH, where the only virtiofsd is
    the legacy one in /usr/lib/qemu. Every start used to fail with "Connection refused"."""
    plugin = PluginProcess([str(DRIVER)], env={"PATH": ORDINARY_PATH})
    plugin.start(short_tmp / "plugin.stderr")
    try:
        configure(plugin, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
        attrs = fingerprint_attributes(plugin)
        assert attrs["driver.vm.fs_transport"] == "9p", attrs
        reason = attrs["driver.vm.fs_transport.reason"]
        assert f"{LEGACY_VIRTIOFSD} is QEMU's legacy C virtiofsd" in reason, reason
        stream, events = collect_events(plugin)
        with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="legacy") as (cfg, fifo, _):
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
            assert fifo.wait_for(RUNNING, 120), fifo.data[-2000:]
            destroy(plugin, cfg.id)
        stream.cancel()
        assert any(m.startswith("Shares use 9p because") and "legacy C" in m for m in events)
    finally:
        plugin.kill()


def start_with_daemons(plugin: PluginProcess, cfg: driver_pb2.TaskConfig, root: Path):  # type: ignore[no-untyped-def]
    response = drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
    daemons = daemons_under(root)
    # A test that saw no daemon would prove nothing about leaks.
    assert daemons, "no virtiofsd serves this task"
    return response.handle, daemons


def test_daemons_end_with_a_stopped_task(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="stop") as (cfg, fifo, _):
        _, daemons = start_with_daemons(plugin, cfg, short_tmp)
        assert fifo.wait_for(RUNNING, 120)
        stop(plugin, cfg.id, 0)
        wait(plugin, cfg.id)
        # Gone when the VM is, not only after DestroyTask (Nomad may destroy much later).
        assert not all_gone(daemons)
        destroy(plugin, cfg.id)
    assert not daemons_under(short_tmp)


@pytest.mark.parametrize("vm_fate", ["keeps running", "killed while the plugin is away"])
def test_daemons_end_after_a_plugin_restart(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    vm_fate: str,
) -> None:
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    second = PluginProcess([str(DRIVER)])
    try:
        with tiny_task(first, short_tmp, tiny_guest, alloc_name="restart") as (cfg, fifo, _):
            handle, daemons = start_with_daemons(first, cfg, short_tmp)
            assert fifo.wait_for(RUNNING, 120)
            assert first.process is not None
            first.process.send_signal(signal.SIGKILL)
            first.wait_exit(5)
            if vm_fate != "keeps running":
                (qemu,) = qemu_processes_under(short_tmp)
                os.kill(qemu.pid, signal.SIGKILL)
                assert not all_gone(daemons)

            second.start(short_tmp / "plugin2.stderr")
            configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
            recover(second, handle)
            if vm_fate == "keeps running":
                stop(second, cfg.id, 0)
            wait(second, cfg.id)
            assert not all_gone(daemons)
            destroy(second, cfg.id)
        assert not daemons_under(short_tmp)
    finally:
        first.kill()
        second.kill()


def test_a_start_that_nomad_gives_up_on_leaves_nothing(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """StartTask cancelled (its deadline passed: Nomad gave up, or the agent is shutting down)
    while the plugin waits for QMP: the VM and its daemons must not run on unknown to anyone."""
    # Where the fake QEMU, running as vm_user, can leave its mark.
    marks = short_tmp / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    spawned = marks / "qemu-was-spawned"
    slow_qemu = write_daemon(
        short_tmp / "bin" / "slow-qemu",
        f'#!/bin/sh\n[ "$1" = --version ] || touch {spawned}; sleep 3\n'
        'exec qemu-system-x86_64 "$@"\n',
    )
    with tiny_task(
        plugin,
        short_tmp,
        tiny_guest,
        alloc_name="cancel",
        plugin_options={"qemu_binary": str(slow_qemu)},
    ) as (cfg, _, alloc):
        call = drv(plugin).StartTask.future(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        # Cancelled once QEMU was spawned (and sleeps before its exec), as a deadline that
        # passes then would: waiting for the mark, not for a clock, on a loaded host.
        assert wait_until(spawned.exists, 60), "the plugin never got as far as starting QEMU"
        call.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        # The plugin handles the cancellation on its side; QEMU would exec a second later.
        # Ended means gone or a zombie: a killed daemon whose status the plugin's Python
        # collects at its next spawn (subprocess's own clean-up) runs nothing.
        _, alive = psutil.wait_procs(processes_under(short_tmp, "virtiofsd"), timeout=10)
        assert not [p for p in alive if _status(p) != psutil.STATUS_ZOMBIE]
        assert wait_until(lambda: not list((alloc / "tiny").iterdir()), 10)
        assert not processes_under(short_tmp, "slow-qemu")
    assert not qemu_processes_under(short_tmp) and not daemons_under(short_tmp)


def _status(proc: psutil.Process) -> str:
    try:
        return str(proc.status())
    except psutil.NoSuchProcess:
        return psutil.STATUS_DEAD
