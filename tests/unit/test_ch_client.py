"""Our client of Cloud Hypervisor's REST API against the in-process fake API server (HTTP over
a unix socket, request bodies read strictly by the model): each call, CH's refusals as
errors that carry its words, and a VMM that is not there."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.cloud_hypervisor.client import ChApiError, ChClient, connect_when_ready
from nomad_vm.vm.cloud_hypervisor.model import (
    CpusConfig,
    DeviceCounters,
    DiskConfig,
    ImageType,
    MemoryConfig,
    ModelError,
    PayloadConfig,
    VmConfig,
    VmState,
    parse_counters,
)
from tests.conftest import wait_until
from tests.fakes.ch_api import FakeVmm, serve_in_thread

CONFIG = VmConfig(
    payload=PayloadConfig(kernel="/dev/null", cmdline="console=ttyS0"),
    cpus=CpusConfig(1, 1),
    memory=MemoryConfig(256 * 2**20),
)


@pytest.fixture
def vmm(short_tmp: Path) -> Iterator[FakeVmm]:
    exited: list[bool] = []
    fake = FakeVmm(short_tmp / "events.json", exit=lambda: exited.append(True))
    server = serve_in_thread(short_tmp / "api.sock", fake)
    yield fake
    server.shutdown()
    server.server_close()


def _events(vmm: FakeVmm) -> list[str]:
    assert vmm.events_path is not None
    text = vmm.events_path.read_text()
    return [json.loads(chunk)["event"] for chunk in text.split("\n\n") if chunk.strip()]


def test_define_boot_inspect_and_press_the_power_button(vmm: FakeVmm, short_tmp: Path) -> None:
    async def run() -> None:
        client = ChClient(short_tmp / "api.sock")
        try:
            assert (await client.ping()).version == "53.0"
            await client.create(CONFIG)
            await client.boot()
            info = await client.info()
            assert info.state is VmState.RUNNING and info.config == CONFIG
            assert await client.counters() == {}  # no block or net device
            await client.power_button()
            assert wait_until(lambda: not vmm.running, 5.0), "the guest did not power off"
            assert (await client.info()).state is VmState.CREATED
        finally:
            await client.close()

    asyncio.run(run())
    assert _events(vmm)[:3] == ["starting", "booting", "booted"]
    assert "shutdown" in _events(vmm)
    # What went over the wire is exactly the model's document.
    assert (
        "PUT",
        "vm.create",
        {
            "payload": {"kernel": "/dev/null", "cmdline": "console=ttyS0"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 256 * 2**20, "shared": False},
            "pvpanic": False,
        },
    ) in vmm.requests


def test_refusals_carry_chs_words(vmm: FakeVmm, short_tmp: Path) -> None:
    async def run() -> None:
        client = ChClient(short_tmp / "api.sock")
        try:
            with pytest.raises(ChApiError) as caught:
                await client.boot()
            assert caught.value.status == 500 and "VmNotCreated" in str(caught.value)
            with pytest.raises(ChApiError, match="VmNotCreated"):
                await client.info()
        finally:
            await client.close()

    asyncio.run(run())


def test_a_body_the_model_refuses_is_a_400_naming_the_property(
    vmm: FakeVmm, short_tmp: Path
) -> None:
    async def run() -> None:
        client = ChClient(short_tmp / "api.sock")
        try:
            reply = await client._http.put("vm.create", json={"payload": {}, "cpus": {"boot": 1}})
        finally:
            await client.close()
        assert reply.status_code == 400
        assert "cpus.boot" in reply.text

    asyncio.run(run())


def test_no_vmm_is_a_hypervisor_error(short_tmp: Path) -> None:
    async def run() -> None:
        client = ChClient(short_tmp / "nobody.sock")
        try:
            with pytest.raises(HypervisorError, match=r"vmm\.ping"):
                await client.ping()
        finally:
            await client.close()

        async def gone() -> bool:
            return False

        with pytest.raises(HypervisorError, match="ended before its API answered"):
            await connect_when_ready(short_tmp / "nobody.sock", gone, 5.0)

    asyncio.run(run())


def test_device_counters_come_in_chs_shape(vmm: FakeVmm, short_tmp: Path) -> None:
    disk = DiskConfig(path="/dev/null", readonly=True, image_type=ImageType.RAW, id="disk0")

    async def run() -> DeviceCounters:
        client = ChClient(short_tmp / "api.sock")
        try:
            await client.create(replace(CONFIG, disks=(disk,)))
            await client.boot()
            return await client.counters()
        finally:
            await client.close()

    counters = asyncio.run(run())
    assert set(counters) == {"disk0"}  # the id we gave the device
    assert counters["disk0"]["read_bytes"] == 4096 and counters["disk0"]["write_ops"] == 0
    assert "read_latency_avg" in counters["disk0"]


def test_the_documented_counters_parse_and_anything_else_is_named() -> None:
    reply = {
        "disk0": {"read_bytes": 1048576, "write_bytes": 0, "read_ops": 3, "write_latency_max": 0},
        "net0": {"rx_bytes": 1500, "rx_frames": 1, "tx_bytes": 0, "tx_frames": 0},
    }
    assert parse_counters(reply) == reply
    assert parse_counters({}) == {}
    for bad, where, says in [
        ([], "", "object"),
        ({"disk0": 5}, "disk0", "object of counters"),
        ({"disk0": {"read_bytes": "5"}}, "disk0.read_bytes", "integer"),
        ({"disk0": {"read_bytes": True}}, "disk0.read_bytes", "integer"),
        ({"net0": {"rx_bytes": -1}}, "net0.rx_bytes", "counter"),
        ({"net0": {"rx_bytes": 2**63}}, "net0.rx_bytes", "counter"),
    ]:
        with pytest.raises(ModelError) as caught:
            parse_counters(bad)
        assert caught.value.path == where and says in str(caught.value), bad
