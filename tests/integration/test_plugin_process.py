"""The real `nomad-driver-vm` executable, started the way Nomad starts it and driven over gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, empty_pb2
from grpc_status import rpc_status

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import (
    base_pb2,
    base_pb2_grpc,
    driver_pb2,
    goplugin_pb2,
    goplugin_pb2_grpc,
    recoverable_error_pb2,
)
from tests.conftest import qemu_processes_under, task_state_in
from tests.integration.pluginkit import (
    DRIVER,
    MARKER,
    base,
    configure,
    cty,
    drv,
    plugin_config,
    task_config,
    tiny_task,
)


def test_run_by_hand_explains_and_fails() -> None:
    proc = subprocess.run([str(DRIVER)], capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "plugin_dir" in proc.stderr and 'driver = "vm"' in proc.stderr


def test_handshake_and_base_plugin(plugin: PluginProcess, short_tmp: Path) -> None:
    assert plugin.handshake is not None
    hs = plugin.handshake
    assert (hs.core, hs.app, hs.network, hs.protocol) == (1, 2, "unix", "grpc")
    assert Path(hs.address).is_absolute()
    assert oct(Path(hs.address).parent.stat().st_mode & 0o777) == "0o700"

    info = base(plugin).PluginInfo(base_pb2.PluginInfoRequest())
    assert info.type == base_pb2.DRIVER
    assert list(info.plugin_api_versions) == ["v0.1.0"]
    assert info.name == "vm"
    assert info.plugin_version.count(".") == 2

    spec = base(plugin).ConfigSchema(base_pb2.ConfigSchemaRequest()).spec
    assert {"image_paths", "data_dir", "accelerator", "qemu_binary"} <= set(spec.object.attributes)

    # The validation launch: SetConfig twice without nomad_config.
    cfg = plugin_config(short_tmp / "data", [])
    for _ in range(2):
        base(plugin).SetConfig(
            base_pb2.SetConfigRequest(msgpack_config=cfg, plugin_api_version="v0.1.0")
        )
    bad = cty({"accelerator": "warp", "data_dir": None, "image_paths": None, "qemu_binary": None})
    with pytest.raises(grpc.RpcError) as err:
        base(plugin).SetConfig(base_pb2.SetConfigRequest(msgpack_config=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.accelerator" in err.value.details()


def test_controller_shutdown_exits_within_a_second(plugin: PluginProcess) -> None:
    stdio = goplugin_pb2_grpc.GRPCStdioStub(plugin.channel).StreamStdio(empty_pb2.Empty())
    goplugin_pb2_grpc.GRPCControllerStub(plugin.channel).Shutdown(goplugin_pb2.Empty())
    started = time.monotonic()
    assert plugin.wait_exit(1.5) == 0
    assert time.monotonic() - started < 1.0
    stdio.cancel()


def test_sigterm_ends_the_plugin_and_removes_its_socket_dir(plugin: PluginProcess) -> None:
    """An init system's or an operator's `kill` ends the plugin as Shutdown does: exit 0,
    and the socket's private directory in /tmp goes with it."""
    assert plugin.process is not None and plugin.handshake is not None
    socket_dir = Path(plugin.handshake.address).parent
    assert socket_dir.is_dir()
    os.kill(plugin.process.pid, signal.SIGTERM)
    assert plugin.wait_exit(5) == 0
    assert not socket_dir.exists()


def test_long_lived_streams_do_not_starve_unary_calls(plugin: PluginProcess) -> None:
    streams = [drv(plugin).TaskEvents(driver_pb2.TaskEventsRequest()) for _ in range(60)]
    streams += [drv(plugin).WaitTask(driver_pb2.WaitTaskRequest(task_id="nope")) for _ in range(0)]
    try:
        started = time.monotonic()
        base(plugin).PluginInfo(base_pb2.PluginInfoRequest(), timeout=5)
        assert time.monotonic() - started < 2.0
    finally:
        for s in streams:
            s.cancel()


def test_fingerprint_first_message_and_attributes(plugin: PluginProcess, short_tmp: Path) -> None:
    base(plugin).SetConfig(
        base_pb2.SetConfigRequest(
            msgpack_config=plugin_config(short_tmp / "data", []),
            nomad_config=base_pb2.NomadConfig(driver=base_pb2.NomadDriverConfig()),
        )
    )
    stream = drv(plugin).Fingerprint(driver_pb2.FingerprintRequest())
    try:
        first = next(stream)
    finally:
        stream.cancel()
    assert first.health == driver_pb2.FingerprintResponse.HEALTHY, first.health_description
    attrs = first.attributes
    assert attrs["driver.vm.version"].string_val
    assert attrs["driver.vm.qemu.version"].string_val.count(".") >= 1
    assert attrs["driver.vm.accelerator"].string_val in {"kvm", "tcg"}
    assert attrs["driver.vm.kvm"].HasField("bool_val")
    if not attrs["driver.vm.kvm"].bool_val:
        assert attrs["driver.vm.accelerator"].string_val == "tcg"
        assert "KVM not usable" in first.health_description


def test_vm_task_lifecycle(plugin: PluginProcess, short_tmp: Path, tiny_guest) -> None:  # type: ignore[no-untyped-def]
    events = drv(plugin).TaskEvents(driver_pb2.TaskEventsRequest())
    # A guest that keeps one vCPU busy, so the CPU stats have something to measure.
    busy = "echo spinning; while :; do :; done"
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="alloc1", run=busy) as (
        cfg,
        fifo,
        alloc,
    ):
        try:
            resp = drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
            assert resp.handle.version >= 1
            assert resp.handle.config.id == cfg.id
            assert resp.handle.driver_state
            first_event = next(events)
            assert first_event.message.startswith("VM started")
            assert first_event.task_name == "tiny" and first_event.alloc_id == cfg.alloc_id

            assert fifo.wait_for(b"spinning", 120), bytes(fifo.data[-2000:])
            assert MARKER in fifo.data

            status = drv(plugin).InspectTask(driver_pb2.InspectTaskRequest(task_id=cfg.id))
            assert status.task.state == driver_pb2.RUNNING
            interval = duration_pb2.Duration(nanos=200_000_000)
            stats = drv(plugin).TaskStats(
                driver_pb2.TaskStatsRequest(task_id=cfg.id, collection_interval=interval)
            )
            samples = [next(stats), next(stats)]
            stats.cancel()
            assert samples[0].stats.agg_resource_usage.memory.rss > 10 * 1024 * 1024
            assert samples[1].stats.agg_resource_usage.cpu.percent > 0

            stop = driver_pb2.StopTaskRequest(
                task_id=cfg.id, timeout=duration_pb2.Duration(seconds=5), signal="SIGINT"
            )
            drv(plugin).StopTask(stop)
            waited = drv(plugin).WaitTask(driver_pb2.WaitTaskRequest(task_id=cfg.id), timeout=30)
            assert waited.HasField("result")
            drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
        finally:
            events.cancel()
    assert not qemu_processes_under(short_tmp)
    assert not list((alloc / "tiny").glob("nomad-vm*"))
    data_dir = short_tmp / "data"
    assert not task_state_in(data_dir)
    with pytest.raises(grpc.RpcError) as err:
        drv(plugin).WaitTask(driver_pb2.WaitTaskRequest(task_id=cfg.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_guest_power_off_is_a_successful_exit(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    run = "echo guest-says-hi"
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="alloc2", run=run) as (cfg, fifo, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        waited = drv(plugin).WaitTask(driver_pb2.WaitTaskRequest(task_id=cfg.id), timeout=180)
        assert waited.result.exit_code == 0 and waited.result.signal == 0, waited
        assert waited.err == ""
        assert fifo.wait_for(b"guest-says-hi", 5)
        drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))


def test_qemu_killed_is_a_failed_exit_with_the_signal(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="alloc3") as (cfg, _, _):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        (qemu,) = qemu_processes_under(short_tmp)
        os.kill(qemu.pid, signal.SIGKILL)
        waited = drv(plugin).WaitTask(driver_pb2.WaitTaskRequest(task_id=cfg.id), timeout=30)
        assert waited.result.signal == signal.SIGKILL
        assert "SIGKILL" in waited.err
        drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))


@pytest.mark.parametrize(
    ("driver_config", "field"),
    [
        ({"kernel": "/etc/hostname"}, "config.kernel"),
        ({"kernel": None}, "config.image"),
        ({"kernel": "/x", "bogus": 1}, "config.bogus"),
    ],
)
def test_bad_task_config_names_the_field_and_leaves_nothing(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,
    driver_config: dict[str, object],  # type: ignore[no-untyped-def]
    field: str,
) -> None:
    data_dir = short_tmp / "data"
    configure(plugin, data_dir, [str(tiny_guest.vmlinux.parent)])
    alloc = short_tmp / "alloc4"
    (alloc / "tiny").mkdir(parents=True)
    full = {"kernel": None, "initramfs": None, "cmdline": None, **driver_config}
    with pytest.raises(grpc.RpcError) as err:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=task_config(alloc, full)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    status = rpc_status.from_call(err.value)
    assert status is not None and status.details, "StartTask errors carry RecoverableError"
    detail = recoverable_error_pb2.RecoverableError()
    assert status.details[0].Unpack(detail)
    assert detail.recoverable is False
    assert not qemu_processes_under(short_tmp)
    assert list((alloc / "tiny").iterdir()) == []


def test_survives_the_agent_going_away(short_tmp: Path) -> None:
    """The agent crashed: both of the plugin's pipes lose their reader. It must keep serving."""
    from nomad_vm.plugin.launcher import Handshake, nomad_plugin_env

    proc = subprocess.Popen(
        [str(DRIVER)],
        env=nomad_plugin_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        hs = Handshake.parse(proc.stdout.readline().decode())
        proc.stdout.close()
        proc.stderr.close()
        channel = grpc.insecure_channel(hs.target)
        stub = base_pb2_grpc.BasePluginStub(channel)
        bad = cty(
            {"accelerator": "warp", "data_dir": None, "image_paths": None, "qemu_binary": None}
        )
        for _ in range(50):  # each failing SetConfig logs a line into the dead pipe
            with pytest.raises(grpc.RpcError):
                stub.SetConfig(base_pb2.SetConfigRequest(msgpack_config=bad))
        assert stub.PluginInfo(base_pb2.PluginInfoRequest()).name == "vm"
        assert proc.poll() is None
        channel.close()
        os.kill(proc.pid, 0)
    finally:
        proc.kill()
        proc.wait()


def test_sigint_is_ignored(plugin: PluginProcess) -> None:
    """Ctrl-C in the terminal of `nomad agent -dev` reaches the plugin too; the agent decides."""
    assert plugin.process is not None
    os.kill(plugin.process.pid, signal.SIGINT)
    time.sleep(0.5)
    assert plugin.process.poll() is None
    assert base(plugin).PluginInfo(base_pb2.PluginInfoRequest()).name == "vm"


def test_fingerprint_unhealthy_without_qemu(plugin: PluginProcess, short_tmp: Path) -> None:
    cfg = cty(
        {
            "accelerator": "auto",
            "data_dir": str(short_tmp / "data"),
            "image_paths": None,
            "qemu_binary": "/nonexistent/qemu-system-x86_64",
        }
    )
    base(plugin).SetConfig(base_pb2.SetConfigRequest(msgpack_config=cfg))
    stream = drv(plugin).Fingerprint(driver_pb2.FingerprintRequest())
    try:
        first = next(stream)
    finally:
        stream.cancel()
    assert first.health == driver_pb2.FingerprintResponse.UNHEALTHY
    assert "/nonexistent/qemu-system-x86_64" in first.health_description


def test_qemu_launch_failure_is_recoverable_and_quotes_qemu(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """A file QEMU cannot boot: StartTask fails with QEMU's own words and leaves nothing."""
    images = short_tmp / "images"
    images.mkdir()
    # An ELF header and nothing else: QEMU refuses it ("Error while loading elf kernel").
    (images / "not-a-kernel").write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 4089)
    overrides: dict[str, object] = {"kernel": str(images / "not-a-kernel"), "initramfs": None}
    with (
        tiny_task(
            plugin,
            short_tmp,
            tiny_guest,
            alloc_name="alloc5",
            overrides=overrides,
            image_paths=[str(images)],
        ) as (cfg, _, alloc),
        pytest.raises(grpc.RpcError) as err,
    ):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "QEMU failed to start" in err.value.details()
    assert "kernel" in err.value.details().lower()
    status = rpc_status.from_call(err.value)
    assert status is not None
    detail = recoverable_error_pb2.RecoverableError()
    assert status.details[0].Unpack(detail) and detail.recoverable is True
    assert not qemu_processes_under(short_tmp)
    assert list((alloc / "tiny").iterdir()) == []
