"""hashicorp.nomad.plugins.base.proto.BasePlugin: identity, config schema, config."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from nomad_vm import __version__, identity, schema
from nomad_vm.plugin.errors_guard import rpc_errors
from nomad_vm.plugin.hclspec import schema_spec
from nomad_vm.plugin.proto import base_pb2, base_pb2_grpc

if TYPE_CHECKING:
    from nomad_vm.driver.port import DriverPort

# The name jobs use in `driver = "..."` (the executable and plugin block are "nomad-driver-vm"),
# unless the plugin is installed under a seed driver's name (nomad_vm.identity).
DRIVER_NAME = identity.OWN.driver_name
API_VERSIONS = ["v0.1.0"]


class BasePluginService(base_pb2_grpc.BasePluginServicer):
    def __init__(self, driver: DriverPort) -> None:
        self.driver = driver

    async def PluginInfo(
        self, request: base_pb2.PluginInfoRequest, context: grpc.aio.ServicerContext
    ) -> base_pb2.PluginInfoResponse:
        return base_pb2.PluginInfoResponse(
            type=base_pb2.DRIVER,
            plugin_api_versions=API_VERSIONS,
            plugin_version=__version__,
            name=identity.current().driver_name,
        )

    async def ConfigSchema(
        self, request: base_pb2.ConfigSchemaRequest, context: grpc.aio.ServicerContext
    ) -> base_pb2.ConfigSchemaResponse:
        spec = schema_spec(schema.plugin_config_schema(identity.current()))
        return base_pb2.ConfigSchemaResponse(spec=spec)

    async def SetConfig(
        self, request: base_pb2.SetConfigRequest, context: grpc.aio.ServicerContext
    ) -> base_pb2.SetConfigResponse:
        # Imported here: the conversions need the driver's types, and all of the driver's
        # modules come with them. SetConfig builds the driver anyway; PluginInfo and
        # ConfigSchema, the fingerprint launch's only calls, need neither.
        from nomad_vm.plugin import convert

        async with rpc_errors(context, "SetConfig"):
            raw = convert.decode_config(request.msgpack_config)
            agent = (
                convert.agent_info(request.nomad_config)
                if request.HasField("nomad_config")
                else None
            )
            self.driver.set_config(raw, agent)
        return base_pb2.SetConfigResponse()
