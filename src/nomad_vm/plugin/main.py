"""Entry point of `nomad-driver-vm`, the executable Nomad starts from its plugin_dir."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING

from nomad_vm import identity
from nomad_vm.plugin import handshake
from nomad_vm.plugin.hclog import configure_plugin_logging
from nomad_vm.plugin.lazy import LazyDriver
from nomad_vm.plugin.server import serve

if TYPE_CHECKING:
    from nomad_vm.driver.port import DriverPort


def main() -> None:
    if not handshake.launched_by_nomad():
        sys.stderr.write(handshake.NOT_A_PROGRAM)
        sys.exit(1)
    try:
        # Which name to register under (`vm`, or a seed driver's): found before anything else
        # answers Nomad, so a wrapper with a wrong name stops here, saying so.
        identity.current()
    except identity.UnknownName as exc:
        sys.stderr.write(f"{exc}\n")
        sys.exit(1)
    if not handshake.supports_protocol():
        sys.stderr.write("nomad-driver-vm speaks go-plugin protocol 2, which Nomad did not offer\n")
        sys.exit(1)
    # Ctrl-C in the terminal of `nomad agent -dev` reaches the whole process group; the agent
    # decides when plugins stop (go-plugin ignores SIGINT for the same reason).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_plugin_logging()
    # grpc's event-loop glue and asyncio log a DEBUG line for every RPC: noise in the agent log.
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.INFO)
    asyncio.run(_run())


def _make_driver() -> DriverPort:
    from nomad_vm.driver.driver import VMDriver

    # The plugin process serves the operator's control socket; in-process drivers (tests) do
    # not unless asked.
    return VMDriver(control=True)


async def _run() -> None:
    # `kill -USR1 <plugin pid>` writes every pending asyncio task's stack to the agent log:
    # the way to see what a stuck RPC is waiting for.
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _dump_tasks)
    await serve(LazyDriver(_make_driver))


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        frames = [
            f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}"
            for f in task.get_stack(limit=12)
        ]
        logging.getLogger(__name__).info(
            "asyncio task %s: %s", task.get_name(), " <- ".join(reversed(frames))
        )


if __name__ == "__main__":
    main()
