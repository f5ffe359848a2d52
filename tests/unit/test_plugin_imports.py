"""The plugin's handshake imports none of the driver (plugin/lazy.py, plugin/deferred.py).

Nomad starts the plugin two or three times per agent start, and the first two launches only
ask PluginInfo, ConfigSchema and SetConfig: importing the driver, the VM layer, storage and
networking there would be paid for nothing. Each check runs in a fresh interpreter, because
this test process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

# The driver and everything only it uses.
DRIVER_SIDE = (
    "nomad_vm.driver",
    "nomad_vm.vm",
    "nomad_vm.storage",
    "nomad_vm.network",
    "nomad_vm.cloudinit",
)


def modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; it prints the JSON list of modules as its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    modules: list[str] = json.loads(proc.stdout.splitlines()[-1])
    return modules


def driver_side(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == p or m.startswith(p + ".") for p in DRIVER_SIDE)]


def test_importing_the_entry_point_loads_no_driver_module() -> None:
    modules = modules_after(
        "import json, sys, nomad_vm.plugin.main; print(json.dumps(sorted(sys.modules)))"
    )
    assert "nomad_vm.plugin.server" in modules  # the entry point's imports did run
    assert driver_side(modules) == []


# Serves as the plugin does, answers the fingerprint launch's calls over a real channel, prints
# the modules loaded by then, then makes a Driver call and prints them again.
SERVE_AND_CALL = """
import asyncio, json, sys, tempfile
from pathlib import Path

import grpc

from nomad_vm.plugin.lazy import LazyDriver
from nomad_vm.plugin.main import _make_driver
from nomad_vm.plugin.proto import base_pb2, base_pb2_grpc, driver_pb2, driver_pb2_grpc
from nomad_vm.plugin.server import serve


async def main() -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="nvi-", dir="/tmp"))
    serving = asyncio.create_task(serve(LazyDriver(_make_driver), sock_dir))
    while not (sock_dir / "plugin.sock").exists():
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(f"unix:{sock_dir}/plugin.sock") as channel:
        base = base_pb2_grpc.BasePluginStub(channel)
        await base.PluginInfo(base_pb2.PluginInfoRequest())
        await base.ConfigSchema(base_pb2.ConfigSchemaRequest())
        print(json.dumps(sorted(sys.modules)))
        driver = driver_pb2_grpc.DriverStub(channel)
        schema = await driver.TaskConfigSchema(driver_pb2.TaskConfigSchemaRequest())
        assert "kernel" in schema.spec.object.attributes
        print(json.dumps(sorted(sys.modules)))
    serving.cancel()


asyncio.run(main())
"""


def test_serving_the_fingerprint_launch_loads_no_driver_module() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SERVE_AND_CALL],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("|grpc")  # the handshake line
    before, after = (json.loads(line) for line in lines[-2:])
    assert driver_side(before) == []
    # The Driver service is really served, and built on its first call.
    assert "nomad_vm.plugin.driver_service" not in before
    assert "nomad_vm.plugin.driver_service" in after
