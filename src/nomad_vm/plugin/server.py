"""Build and run the plugin's gRPC server (grpc.aio: long-lived streams cost no threads)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from nomad_vm.plugin import handshake
from nomad_vm.plugin.base_service import BasePluginService
from nomad_vm.plugin.deferred import DeferredService
from nomad_vm.plugin.goplugin_services import BrokerService, ControllerService, StdioService
from nomad_vm.plugin.lazy import LazyDriver
from nomad_vm.plugin.proto import base_pb2_grpc, goplugin_pb2_grpc

if TYPE_CHECKING:
    from nomad_vm.driver.port import DriverPort

log = logging.getLogger(__name__)

# go-plugin's client sets no message size limits; Python's default receive limit is 4 MiB.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]
# Seconds in-flight RPCs get to finish after GRPCController.Shutdown (go-plugin waits 2 s).
SHUTDOWN_GRACE = 0.5
DRIVER_SERVICE = "hashicorp.nomad.plugins.drivers.proto.Driver"


async def serve(driver: LazyDriver, socket_dir: Path | None = None) -> None:
    """Listen on a unix socket, announce it on stdout, serve until Shutdown."""
    socket_dir = socket_dir or handshake.make_socket_dir()
    socket_path = socket_dir / "plugin.sock"
    server = grpc.aio.server(options=SERVER_OPTIONS)
    stop = asyncio.Event()
    port = cast("DriverPort", driver)  # LazyDriver forwards everything else to the driver

    base_pb2_grpc.add_BasePluginServicer_to_server(BasePluginService(port), server)
    server.add_generic_rpc_handlers(
        (DeferredService(DRIVER_SERVICE, functools.partial(_add_driver_service, driver)),)
    )
    goplugin_pb2_grpc.add_GRPCControllerServicer_to_server(ControllerService(stop.set), server)
    goplugin_pb2_grpc.add_GRPCStdioServicer_to_server(StdioService(), server)
    goplugin_pb2_grpc.add_GRPCBrokerServicer_to_server(BrokerService(), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("plugin", health_pb2.HealthCheckResponse.SERVING)

    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    handshake.announce(socket_path)
    log.info("plugin serving", extra={"fields": {"socket": str(socket_path)}})
    # SIGTERM (an init system, `kill`, a test) ends the plugin as Shutdown does: VMs keep
    # running for the next plugin to recover, and the socket's directory does not pile up in /tmp.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
        log.info("shutdown requested")
    finally:
        await server.stop(SHUTDOWN_GRACE)
        await driver.shutdown()
        # The directory holds the socket only (shutil.rmtree would be one more import).
        socket_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            socket_dir.rmdir()


def _add_driver_service(driver: LazyDriver, target: Any) -> None:
    """Registers the Driver service on ``target``; imports its module (see plugin/deferred.py)."""
    from nomad_vm.plugin.driver_service import DriverService
    from nomad_vm.plugin.proto import driver_pb2_grpc

    driver_pb2_grpc.add_DriverServicer_to_server(
        DriverService(cast("DriverPort", driver), driver), target
    )
