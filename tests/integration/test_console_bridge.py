"""A VM with a display, through the real plugin: QEMU's VNC server answers on the socket the
plugin handed it, reached through the console server's websocket bridge (``console.bridge``),
and the console registry entry lives exactly as long as the task."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from nomad_vm.console.bridge import relay
from nomad_vm.console.registry import read_entries
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import qemu_processes_under
from tests.integration.pluginkit import drv, tiny_task

pytestmark = pytest.mark.integration

RUNNING = b"nomad-vm tiny guest: running"


async def rfb_greeting_through_bridge(socket: str) -> tuple[bytes, bytes]:
    """Serve the bridge on loopback, connect a websocket client, read QEMU's RFB greeting,
    answer it, and read the security types QEMU offers."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("binary",))
        await ws.prepare(request)
        await relay(ws, socket)
        return ws

    app = web.Application()
    app.router.add_get("/vnc", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"http://127.0.0.1:{port}/vnc", protocols=("binary",)) as ws,
        ):
            greeting = await ws.receive_bytes(timeout=30)
            await ws.send_bytes(b"RFB 003.008\n")
            security = await ws.receive_bytes(timeout=30)
            return greeting, security
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("display", ["vga", "virtio"])
def test_vnc_reached_over_the_websocket_bridge(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    display: str,
) -> None:
    overrides: dict[str, object] = {"display": display}
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="vnc", overrides=overrides) as (
        cfg,
        fifo,
        _,
    ):
        cfg.namespace = "team-a"
        cfg.job_name = "console-job"
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            assert fifo.wait_for(RUNNING, 120)
            data_dir = short_tmp / "data"
            (entry,) = read_entries(data_dir)
            assert (entry.alloc_id, entry.task, entry.namespace, entry.job, entry.display) == (
                cfg.alloc_id,
                "tiny",
                "team-a",
                "console-job",
                display,
            )
            socket = Path(entry.socket)
            assert socket.name == "vnc.sock" and stat.S_ISSOCK(socket.stat().st_mode)
            # In the task's runtime dir (root's, 0700); the registry is root's alone too.
            assert stat.S_IMODE(socket.parent.stat().st_mode) == 0o700
            assert stat.S_IMODE((data_dir / "consoles").stat().st_mode) == 0o700
            (qemu,) = qemu_processes_under(short_tmp)
            argv = qemu.cmdline()
            assert argv[argv.index("-vnc") + 1] == "none"
            assert {"vga": "VGA,id=video0", "virtio": "virtio-vga,id=video0"}[display] in argv
            # QEMU listens on no TCP port: its only listener is the handed unix socket.
            assert not [c for c in qemu.net_connections("inet") if c.status == "LISTEN"]
            greeting, security = asyncio.run(rfb_greeting_through_bridge(str(socket)))
            print(f"\nRFB through the bridge: {greeting!r}, security types {security!r}")
            assert greeting == b"RFB 003.008\n"
            # One security type offered: None (1). Access control is the socket's directory.
            assert security == b"\x01\x01"
        finally:
            drv(plugin).StopTask(driver_pb2.StopTaskRequest(task_id=cfg.id))
            drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
    assert read_entries(short_tmp / "data") == []
    assert not list((short_tmp / "data" / "consoles").iterdir())
    assert not qemu_processes_under(short_tmp)


def test_display_on_microvm_is_refused_naming_the_option(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    overrides: dict[str, object] = {"display": "virtio", "os": {"machine": "microvm"}}
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="mvm", overrides=overrides) as (
        cfg,
        _,
        _,
    ):
        with pytest.raises(Exception) as failed:
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert "config.display" in str(failed.value)
        assert "microvm" in str(failed.value)
    assert not qemu_processes_under(short_tmp)
    assert not (short_tmp / "data" / "consoles").exists() or not list(
        (short_tmp / "data" / "consoles").iterdir()
    )


def test_a_failed_start_leaves_no_console_entry(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    # The initramfs as the kernel: accepted by validation (an allowed regular file), refused
    # by QEMU at launch, after the registry entry was written: the replay must remove it.
    overrides: dict[str, object] = {"display": "vga", "kernel": str(tiny_guest.initramfs)}
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="bad", overrides=overrides) as (
        cfg,
        _,
        _,
    ):
        with pytest.raises(Exception) as failed:
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert "QEMU failed to start" in str(failed.value)
    consoles = short_tmp / "data" / "consoles"
    assert consoles.is_dir() and not list(consoles.iterdir())
    assert not qemu_processes_under(short_tmp)


def test_console_survives_a_plugin_restart_and_goes_with_the_task(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """QEMU keeps serving the handed socket without the plugin; the new plugin's DestroyTask
    removes the entry the first one wrote."""
    from tests.integration.pluginkit import DRIVER, configure
    from tests.integration.test_recovery import recover

    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    second = PluginProcess([str(DRIVER)])
    overrides: dict[str, object] = {"display": "vga"}
    try:
        with tiny_task(first, short_tmp, tiny_guest, alloc_name="rec", overrides=overrides) as (
            cfg,
            fifo,
            _,
        ):
            handle = drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60).handle
            assert fifo.wait_for(RUNNING, 120)
            first.kill()
            (entry,) = read_entries(short_tmp / "data")
            greeting, _ = asyncio.run(rfb_greeting_through_bridge(entry.socket))
            assert greeting == b"RFB 003.008\n"
            second.start(short_tmp / "plugin2.stderr")
            configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
            recover(second, handle)
            drv(second).StopTask(driver_pb2.StopTaskRequest(task_id=cfg.id))
            drv(second).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
    finally:
        first.kill()
        second.kill()
    assert read_entries(short_tmp / "data") == []
    assert not qemu_processes_under(short_tmp)
