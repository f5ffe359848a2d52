"""Plugin start latency: exec of nomad-driver-vm -> handshake line -> first PluginInfo answer.

Nomad starts the plugin two or three times while the agent boots (fingerprint, config validation,
the long-lived instance), so this is paid several times per agent start. A bare `python3 -c pass`
is measured in the same run, alternating with the plugin, to give the numbers a scale that does not
depend on how busy the machine is.

The target (issue 10): the handshake within 150 ms, or within 6x the bare interpreter measured
in the same run; both numbers are printed, and whether either holds.

Run: .venv/bin/python bench/plugin_start.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import base_pb2, base_pb2_grpc, goplugin_pb2, goplugin_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
TARGET_MS = 150.0
TARGET_RATIO = 6.0
DRIVER = REPO / ".venv" / "bin" / "nomad-driver-vm"


def time_bare_python() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def time_plugin(workdir: Path) -> tuple[float, float, float]:
    """Seconds to the handshake line, to the first PluginInfo answer, and to exit on Shutdown."""
    plugin = PluginProcess([str(DRIVER)])
    started = time.perf_counter()
    plugin.start(workdir / "plugin.stderr")
    handshake = time.perf_counter() - started
    base_pb2_grpc.BasePluginStub(plugin.channel).PluginInfo(base_pb2.PluginInfoRequest())
    info = time.perf_counter() - started
    stop_started = time.perf_counter()
    goplugin_pb2_grpc.GRPCControllerStub(plugin.channel).Shutdown(goplugin_pb2.Empty())
    plugin.wait_exit(5.0)
    stop = time.perf_counter() - stop_started
    plugin.kill()
    return handshake, info, stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    bare: list[float] = []
    hs: list[float] = []
    info: list[float] = []
    stop: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        time_plugin(Path(tmp))  # warm the page cache once; not counted
        for _ in range(args.runs):
            bare.append(time_bare_python())
            h, i, s = time_plugin(Path(tmp))
            hs.append(h)
            info.append(i)
            stop.append(s)
    b = statistics.median(bare)
    h = statistics.median(hs)
    print(f"runs: {args.runs} (medians, alternating plugin and bare python)")
    print(f"bare `python3 -c pass`:        {b * 1000:7.1f} ms")
    print(f"plugin exec -> handshake line: {h * 1000:7.1f} ms  ({h / b:.1f}x bare python)")
    print(
        f"plugin exec -> PluginInfo:     {statistics.median(info) * 1000:7.1f} ms  "
        f"({statistics.median(info) / b:.1f}x bare python)"
    )
    print(f"Shutdown RPC -> process exit:  {statistics.median(stop) * 1000:7.1f} ms")
    met = h * 1000 <= TARGET_MS or h / b <= TARGET_RATIO
    print(
        f"target: handshake <= {TARGET_MS:.0f} ms or <= {TARGET_RATIO:.0f}x bare python: "
        f"{'met' if met else 'missed'} ({h * 1000:.0f} ms, {h / b:.1f}x)"
    )


if __name__ == "__main__":
    main()
