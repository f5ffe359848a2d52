"""Driver.Init / Driver.Shutdown (Nomad 2.0.4+) and the LazyDriver they act on.

Nomad's semantics (docs/plugin-protocol.md, "Init and Shutdown"): Init after SetConfig on every
dispense, including a reattach to a running plugin, so it comes more than once per process;
Shutdown on a graceful agent shutdown with a 2 s deadline, then go-plugin's Kill. The driver
here is a fake: these are the plugin layer's rules, the real driver is exercised by
tests/integration/test_plugin_process.py.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import grpc
import msgpack
import pytest

from nomad_vm.driver.port import DriverPort
from nomad_vm.driver.types import AgentInfo
from nomad_vm.errors import ConfigError
from nomad_vm.plugin.lazy import LazyDriver
from nomad_vm.plugin.proto import (
    base_pb2,
    base_pb2_grpc,
    driver_pb2,
    driver_pb2_grpc,
    goplugin_pb2,
    goplugin_pb2_grpc,
)
from nomad_vm.plugin.server import serve


class FakeDriver:
    """Records what LazyDriver does to it; its close can be held with ``release``."""

    def __init__(self, log: list[str], number: int) -> None:
        self.log = log
        self.number = number
        self.config: tuple[Mapping[str, object] | None, AgentInfo | None] | None = None
        self.release = asyncio.Event()
        self.release.set()
        self.closed = False
        self.fail_close = False

    def set_config(self, raw: Mapping[str, object] | None, agent: AgentInfo | None) -> None:
        if raw is not None and raw.get("bad"):
            raise ConfigError("config.bad", "refused")
        self.config = (raw, agent)
        self.log.append(f"config {self.number}")

    def task_config_schema(self) -> object:
        from nomad_vm import schema

        return schema.TASK_CONFIG

    async def shutdown(self) -> None:
        self.log.append(f"closing {self.number}")
        await self.release.wait()
        if self.fail_close:
            raise RuntimeError("close failed")
        self.closed = True
        self.log.append(f"closed {self.number}")


class Factory:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.built: list[FakeDriver] = []

    def __call__(self) -> DriverPort:
        driver = FakeDriver(self.log, len(self.built) + 1)
        self.built.append(driver)
        self.log.append(f"built {driver.number}")
        return cast(DriverPort, driver)


AGENT = AgentInfo(client_min_port=14000, client_max_port=14512, core_mhz=2000, core_count=2)


def test_shutdown_never_builds_a_driver() -> None:
    factory = Factory()
    asyncio.run(LazyDriver(factory).shutdown())
    assert factory.built == []


def test_init_twice_builds_once_and_closes_nothing() -> None:
    factory = Factory()
    lazy = LazyDriver(factory)

    async def main() -> None:
        lazy.set_config({"a": 1}, AGENT)
        await lazy.init()
        await lazy.init()

    asyncio.run(main())
    assert factory.log == ["built 1", "config 1"]


def test_a_driver_after_a_shutdown_gets_the_last_accepted_config() -> None:
    factory = Factory()
    lazy = LazyDriver(factory)

    async def main() -> None:
        lazy.set_config({"a": 1}, AGENT)
        lazy.set_config({"a": 2}, None)  # the driver keeps its agent info then
        with pytest.raises(ConfigError):
            lazy.set_config({"bad": True}, None)
        await lazy.shutdown()
        await lazy.init()

    asyncio.run(main())
    first, second = factory.built
    assert first.closed and not second.closed
    assert second.config == ({"a": 2}, AGENT)


def test_init_after_a_shutdown_waits_for_the_close() -> None:
    """A VM's monitor takes one client at a time: the new driver must not reattach to VMs the
    old one still holds."""
    factory = Factory()
    lazy = LazyDriver(factory)

    async def main() -> None:
        lazy.set_config({"a": 1}, AGENT)
        factory.built[0].release.clear()
        closing = asyncio.create_task(lazy.shutdown())
        init = asyncio.create_task(lazy.init())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not init.done()
        factory.built[0].release.set()
        await asyncio.gather(closing, init)

    asyncio.run(main())
    assert factory.log == ["built 1", "config 1", "closing 1", "closed 1", "built 2", "config 2"]


def test_a_caller_that_stops_waiting_does_not_stop_the_close() -> None:
    factory = Factory()
    lazy = LazyDriver(factory)

    async def main() -> None:
        lazy.set_config({}, None)
        first = factory.built[0]
        first.release.clear()
        caller = asyncio.create_task(lazy.shutdown())
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        first.release.set()
        await lazy.shutdown()  # the plugin's exit waits for the close that is under way
        assert first.closed

    asyncio.run(main())
    assert factory.log.count("closing 1") == 1


def test_a_failed_close_is_logged_and_the_driver_let_go(caplog: pytest.LogCaptureFixture) -> None:
    factory = Factory()
    lazy = LazyDriver(factory)

    async def main() -> None:
        lazy.set_config({}, None)
        factory.built[0].fail_close = True
        await lazy.shutdown()
        await lazy.init()

    with caplog.at_level(logging.ERROR, logger="nomad_vm.plugin.lazy"):
        asyncio.run(main())
    assert "closing the driver failed" in caplog.text
    assert len(factory.built) == 2


def cty_config() -> bytes:
    return msgpack.packb({"data_dir": "/var/lib/nomad-vm"}, use_bin_type=False)


def test_over_grpc_shutdown_answers_in_time_and_init_brings_a_driver_back() -> None:
    """Through the plugin's own server: SetConfig and Init, then Shutdown with a deadline
    (Nomad's is 2 s) while the close hangs, then (an agent reattaching) Init twice, then
    go-plugin's Kill."""
    factory = Factory()

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="nvl-", dir="/tmp") as tmp:
            sock_dir = Path(tmp) / "s"
            sock_dir.mkdir()
            serving = asyncio.create_task(serve(LazyDriver(factory), sock_dir))
            while not (sock_dir / "plugin.sock").exists():
                await asyncio.sleep(0.01)
            async with grpc.aio.insecure_channel(f"unix:{sock_dir}/plugin.sock") as channel:
                base = base_pb2_grpc.BasePluginStub(channel)
                driver = driver_pb2_grpc.DriverStub(channel)
                await base.SetConfig(
                    base_pb2.SetConfigRequest(
                        msgpack_config=cty_config(),
                        nomad_config=base_pb2.NomadConfig(driver=base_pb2.NomadDriverConfig()),
                    )
                )
                await driver.Init(driver_pb2.InitRequest())
                first = factory.built[0]
                first.release.clear()  # the close hangs past Nomad's deadline
                await driver.Shutdown(driver_pb2.ShutdownRequest(), timeout=1.0)
                assert not first.closed
                first.release.set()
                await driver.Init(driver_pb2.InitRequest())
                await driver.Init(driver_pb2.InitRequest())
                await goplugin_pb2_grpc.GRPCControllerStub(channel).Shutdown(goplugin_pb2.Empty())
            await serving

    asyncio.run(main())
    assert factory.log == [
        "built 1",
        "config 1",
        "closing 1",
        "closed 1",
        "built 2",
        "config 2",
        "closing 2",  # go-plugin's Kill: the process exits
        "closed 2",
    ]
    assert factory.built[1].config is not None
    assert factory.built[1].config[0] == {"data_dir": "/var/lib/nomad-vm"}
