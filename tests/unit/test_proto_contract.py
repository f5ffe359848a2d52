"""Wire contract of the generated protobuf/gRPC code against Nomad's plugin protocol.

The facts asserted here were checked against Nomad v1.11.2 (plugins/base/proto,
plugins/drivers/proto, plugins/shared/hclspec, plugins/shared/structs/proto) and go-plugin
v1.7.0 (internal/plugin); Nomad v2.0.5's protos, Driver.Init and Driver.Shutdown included, have
the same descriptors as ours (docs/plugin-protocol.md). What goes on the wire, and therefore
must never drift: fully qualified service/method/message names (method paths,
google.protobuf.Any type URLs), field numbers and field types. Field names are asserted too,
because they are kept identical to Nomad's (JSON names, reflection).
"""

from __future__ import annotations

import pytest
from google.protobuf import descriptor as _d
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.any_pb2 import Any

from nomad_vm.plugin.proto import (
    attribute_pb2,
    base_pb2,
    base_pb2_grpc,
    driver_pb2,
    driver_pb2_grpc,
    goplugin_pb2,
    goplugin_pb2_grpc,
    hclspec_pb2,
    recoverable_error_pb2,
)

FD = _d.FieldDescriptor

DRIVERS = "hashicorp.nomad.plugins.drivers.proto"
BASE = "hashicorp.nomad.plugins.base.proto"
HCLSPEC = "hashicorp.nomad.plugins.shared.hclspec"
STRUCTS = "hashicorp.nomad.plugins.shared.structs"

# Short aliases for field types.
STRING, BYTES, BOOL = FD.TYPE_STRING, FD.TYPE_BYTES, FD.TYPE_BOOL
INT32, INT64, UINT32, UINT64 = FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64
DOUBLE, ENUM, MESSAGE = FD.TYPE_DOUBLE, FD.TYPE_ENUM, FD.TYPE_MESSAGE


def _services() -> dict[str, _d.ServiceDescriptor]:
    out: dict[str, _d.ServiceDescriptor] = {}
    for mod in (base_pb2, driver_pb2, goplugin_pb2):
        for svc in mod.DESCRIPTOR.services_by_name.values():
            out[svc.full_name] = svc
    return out


# --------------------------------------------------------------------------------------
# Services and methods


def test_service_full_names() -> None:
    assert set(_services()) == {
        f"{BASE}.BasePlugin",
        f"{DRIVERS}.Driver",
        "plugin.GRPCController",
        "plugin.GRPCStdio",
        "plugin.GRPCBroker",
    }


UNARY, SERVER_STREAM, BIDI = "unary", "server-stream", "bidi"

DRIVER_METHODS = {
    # name: (request, response, kind)
    "Init": ("InitRequest", "InitResponse", UNARY),
    "TaskConfigSchema": ("TaskConfigSchemaRequest", "TaskConfigSchemaResponse", UNARY),
    "Capabilities": ("CapabilitiesRequest", "CapabilitiesResponse", UNARY),
    "Fingerprint": ("FingerprintRequest", "FingerprintResponse", SERVER_STREAM),
    "RecoverTask": ("RecoverTaskRequest", "RecoverTaskResponse", UNARY),
    "StartTask": ("StartTaskRequest", "StartTaskResponse", UNARY),
    "WaitTask": ("WaitTaskRequest", "WaitTaskResponse", UNARY),
    "StopTask": ("StopTaskRequest", "StopTaskResponse", UNARY),
    "DestroyTask": ("DestroyTaskRequest", "DestroyTaskResponse", UNARY),
    "InspectTask": ("InspectTaskRequest", "InspectTaskResponse", UNARY),
    "TaskStats": ("TaskStatsRequest", "TaskStatsResponse", SERVER_STREAM),
    "TaskEvents": ("TaskEventsRequest", "DriverTaskEvent", SERVER_STREAM),
    "Shutdown": ("ShutdownRequest", "ShutdownResponse", UNARY),
    "SignalTask": ("SignalTaskRequest", "SignalTaskResponse", UNARY),
    "ExecTask": ("ExecTaskRequest", "ExecTaskResponse", UNARY),
    "ExecTaskStreaming": ("ExecTaskStreamingRequest", "ExecTaskStreamingResponse", BIDI),
    "CreateNetwork": ("CreateNetworkRequest", "CreateNetworkResponse", UNARY),
    "DestroyNetwork": ("DestroyNetworkRequest", "DestroyNetworkResponse", UNARY),
}


def _kind(m: _d.MethodDescriptor) -> str:
    kinds = {
        (False, False): UNARY,
        (False, True): SERVER_STREAM,
        (True, False): "client-stream",
        (True, True): BIDI,
    }
    return kinds[(m.client_streaming, m.server_streaming)]


def test_driver_methods() -> None:
    svc = _services()[f"{DRIVERS}.Driver"]
    got = {m.name: (m.input_type.full_name, m.output_type.full_name, _kind(m)) for m in svc.methods}
    want = {
        name: (f"{DRIVERS}.{req}", f"{DRIVERS}.{resp}", kind)
        for name, (req, resp, kind) in DRIVER_METHODS.items()
    }
    assert got == want


def test_base_plugin_methods() -> None:
    svc = _services()[f"{BASE}.BasePlugin"]
    got = {m.name: (m.input_type.full_name, m.output_type.full_name, _kind(m)) for m in svc.methods}
    assert got == {
        "PluginInfo": (f"{BASE}.PluginInfoRequest", f"{BASE}.PluginInfoResponse", UNARY),
        "ConfigSchema": (f"{BASE}.ConfigSchemaRequest", f"{BASE}.ConfigSchemaResponse", UNARY),
        "SetConfig": (f"{BASE}.SetConfigRequest", f"{BASE}.SetConfigResponse", UNARY),
    }


def test_goplugin_methods() -> None:
    svcs = _services()

    def methods(name: str) -> dict[str, tuple[str, str, str]]:
        return {
            m.name: (m.input_type.full_name, m.output_type.full_name, _kind(m))
            for m in svcs[name].methods
        }

    assert methods("plugin.GRPCController") == {"Shutdown": ("plugin.Empty", "plugin.Empty", UNARY)}
    assert methods("plugin.GRPCStdio") == {
        "StreamStdio": ("google.protobuf.Empty", "plugin.StdioData", SERVER_STREAM)
    }
    assert methods("plugin.GRPCBroker") == {
        "StartStream": ("plugin.ConnInfo", "plugin.ConnInfo", BIDI)
    }


def test_generated_grpc_modules_expose_servicers() -> None:
    # The servicer/stub/registration helpers the plugin server is built from.
    for mod, svc in (
        (base_pb2_grpc, "BasePlugin"),
        (driver_pb2_grpc, "Driver"),
        (goplugin_pb2_grpc, "GRPCController"),
        (goplugin_pb2_grpc, "GRPCStdio"),
        (goplugin_pb2_grpc, "GRPCBroker"),
    ):
        assert hasattr(mod, f"{svc}Servicer")
        assert hasattr(mod, f"{svc}Stub")
        assert hasattr(mod, f"add_{svc}Servicer_to_server")


# --------------------------------------------------------------------------------------
# Messages and fields

# (message full name, field name, number, type, repeated, message/enum type full name or None)
FIELDS: list[tuple[str, str, int, int, bool, str | None]] = [
    # TaskHandle
    (f"{DRIVERS}.TaskHandle", "version", 1, INT32, False, None),
    (f"{DRIVERS}.TaskHandle", "config", 2, MESSAGE, False, f"{DRIVERS}.TaskConfig"),
    (f"{DRIVERS}.TaskHandle", "state", 3, ENUM, False, f"{DRIVERS}.TaskState"),
    (f"{DRIVERS}.TaskHandle", "driver_state", 4, BYTES, False, None),
    # TaskConfig
    (f"{DRIVERS}.TaskConfig", "id", 1, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "name", 2, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "msgpack_driver_config", 3, BYTES, False, None),
    (f"{DRIVERS}.TaskConfig", "env", 4, MESSAGE, True, f"{DRIVERS}.TaskConfig.EnvEntry"),
    (
        f"{DRIVERS}.TaskConfig",
        "device_env",
        5,
        MESSAGE,
        True,
        f"{DRIVERS}.TaskConfig.DeviceEnvEntry",
    ),
    (f"{DRIVERS}.TaskConfig", "resources", 6, MESSAGE, False, f"{DRIVERS}.Resources"),
    (f"{DRIVERS}.TaskConfig", "mounts", 7, MESSAGE, True, f"{DRIVERS}.Mount"),
    (f"{DRIVERS}.TaskConfig", "devices", 8, MESSAGE, True, f"{DRIVERS}.Device"),
    (f"{DRIVERS}.TaskConfig", "user", 9, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "alloc_dir", 10, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "stdout_path", 11, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "stderr_path", 12, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "task_group_name", 13, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "job_name", 14, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "alloc_id", 15, STRING, False, None),
    (
        f"{DRIVERS}.TaskConfig",
        "network_isolation_spec",
        16,
        MESSAGE,
        False,
        f"{DRIVERS}.NetworkIsolationSpec",
    ),
    (f"{DRIVERS}.TaskConfig", "dns", 17, MESSAGE, False, f"{DRIVERS}.DNSConfig"),
    (f"{DRIVERS}.TaskConfig", "job_id", 18, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "namespace", 19, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "node_name", 20, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "node_id", 21, STRING, False, None),
    (f"{DRIVERS}.TaskConfig", "parent_job_id", 22, STRING, False, None),
    # Resources and friends
    (
        f"{DRIVERS}.Resources",
        "allocated_resources",
        1,
        MESSAGE,
        False,
        f"{DRIVERS}.AllocatedTaskResources",
    ),
    (f"{DRIVERS}.Resources", "linux_resources", 2, MESSAGE, False, f"{DRIVERS}.LinuxResources"),
    (f"{DRIVERS}.Resources", "ports", 3, MESSAGE, True, f"{DRIVERS}.PortMapping"),
    (
        f"{DRIVERS}.AllocatedTaskResources",
        "cpu",
        1,
        MESSAGE,
        False,
        f"{DRIVERS}.AllocatedCpuResources",
    ),
    (
        f"{DRIVERS}.AllocatedTaskResources",
        "memory",
        2,
        MESSAGE,
        False,
        f"{DRIVERS}.AllocatedMemoryResources",
    ),
    (
        f"{DRIVERS}.AllocatedTaskResources",
        "networks",
        5,
        MESSAGE,
        True,
        f"{DRIVERS}.NetworkResource",
    ),
    (f"{DRIVERS}.AllocatedCpuResources", "cpu_shares", 1, INT64, False, None),
    (f"{DRIVERS}.AllocatedMemoryResources", "memory_mb", 2, INT64, False, None),
    (f"{DRIVERS}.AllocatedMemoryResources", "memory_max_mb", 3, INT64, False, None),
    (f"{DRIVERS}.LinuxResources", "cpu_shares", 3, INT64, False, None),
    (f"{DRIVERS}.LinuxResources", "memory_limit_bytes", 4, INT64, False, None),
    (f"{DRIVERS}.LinuxResources", "cpuset_cpus", 6, STRING, False, None),
    (f"{DRIVERS}.LinuxResources", "PercentTicks", 8, DOUBLE, False, None),
    (f"{DRIVERS}.LinuxResources", "cpuset_cgroup", 9, STRING, False, None),
    (f"{DRIVERS}.PortMapping", "label", 1, STRING, False, None),
    (f"{DRIVERS}.PortMapping", "value", 2, INT32, False, None),
    (f"{DRIVERS}.PortMapping", "to", 3, INT32, False, None),
    (f"{DRIVERS}.PortMapping", "host_ip", 4, STRING, False, None),
    (f"{DRIVERS}.Mount", "task_path", 1, STRING, False, None),
    (f"{DRIVERS}.Mount", "host_path", 2, STRING, False, None),
    (f"{DRIVERS}.Mount", "readonly", 3, BOOL, False, None),
    (f"{DRIVERS}.Mount", "propagation_mode", 4, STRING, False, None),
    (f"{DRIVERS}.Mount", "selinux_label", 5, STRING, False, None),
    (f"{DRIVERS}.Mount", "request_name", 6, STRING, False, None),
    (
        f"{DRIVERS}.NetworkIsolationSpec",
        "mode",
        1,
        ENUM,
        False,
        f"{DRIVERS}.NetworkIsolationSpec.NetworkIsolationMode",
    ),
    (f"{DRIVERS}.NetworkIsolationSpec", "path", 2, STRING, False, None),
    (
        f"{DRIVERS}.NetworkIsolationSpec",
        "hostsConfig",
        4,
        MESSAGE,
        False,
        f"{DRIVERS}.HostsConfig",
    ),
    # Start / wait / stop
    (f"{DRIVERS}.RecoverTaskRequest", "task_id", 1, STRING, False, None),
    (f"{DRIVERS}.RecoverTaskRequest", "handle", 2, MESSAGE, False, f"{DRIVERS}.TaskHandle"),
    (f"{DRIVERS}.StartTaskRequest", "task", 1, MESSAGE, False, f"{DRIVERS}.TaskConfig"),
    (
        f"{DRIVERS}.StartTaskResponse",
        "result",
        1,
        ENUM,
        False,
        f"{DRIVERS}.StartTaskResponse.Result",
    ),
    (f"{DRIVERS}.StartTaskResponse", "driver_error_msg", 2, STRING, False, None),
    (f"{DRIVERS}.StartTaskResponse", "handle", 3, MESSAGE, False, f"{DRIVERS}.TaskHandle"),
    (
        f"{DRIVERS}.StartTaskResponse",
        "network_override",
        4,
        MESSAGE,
        False,
        f"{DRIVERS}.NetworkOverride",
    ),
    (f"{DRIVERS}.NetworkOverride", "port_map", 1, MESSAGE, True, None),
    (f"{DRIVERS}.NetworkOverride", "addr", 2, STRING, False, None),
    (f"{DRIVERS}.NetworkOverride", "auto_advertise", 3, BOOL, False, None),
    (f"{DRIVERS}.WaitTaskResponse", "result", 1, MESSAGE, False, f"{DRIVERS}.ExitResult"),
    (f"{DRIVERS}.WaitTaskResponse", "err", 2, STRING, False, None),
    (f"{DRIVERS}.ExitResult", "exit_code", 1, INT32, False, None),
    (f"{DRIVERS}.ExitResult", "signal", 2, INT32, False, None),
    (f"{DRIVERS}.ExitResult", "oom_killed", 3, BOOL, False, None),
    (f"{DRIVERS}.StopTaskRequest", "task_id", 1, STRING, False, None),
    (
        f"{DRIVERS}.StopTaskRequest",
        "timeout",
        2,
        MESSAGE,
        False,
        "google.protobuf.Duration",
    ),
    (f"{DRIVERS}.StopTaskRequest", "signal", 3, STRING, False, None),
    (f"{DRIVERS}.DestroyTaskRequest", "force", 2, BOOL, False, None),
    (f"{DRIVERS}.ExecTaskResponse", "result", 3, MESSAGE, False, f"{DRIVERS}.ExitResult"),
    # Stats
    (f"{DRIVERS}.TaskStatsRequest", "task_id", 1, STRING, False, None),
    (
        f"{DRIVERS}.TaskStatsRequest",
        "collection_interval",
        2,
        MESSAGE,
        False,
        "google.protobuf.Duration",
    ),
    (f"{DRIVERS}.TaskStatsResponse", "stats", 1, MESSAGE, False, f"{DRIVERS}.TaskStats"),
    (f"{DRIVERS}.TaskStats", "id", 1, STRING, False, None),
    (f"{DRIVERS}.TaskStats", "timestamp", 2, MESSAGE, False, "google.protobuf.Timestamp"),
    (
        f"{DRIVERS}.TaskStats",
        "agg_resource_usage",
        3,
        MESSAGE,
        False,
        f"{DRIVERS}.TaskResourceUsage",
    ),
    (
        f"{DRIVERS}.TaskStats",
        "resource_usage_by_pid",
        4,
        MESSAGE,
        True,
        f"{DRIVERS}.TaskStats.ResourceUsageByPidEntry",
    ),
    (f"{DRIVERS}.TaskResourceUsage", "cpu", 1, MESSAGE, False, f"{DRIVERS}.CPUUsage"),
    (f"{DRIVERS}.TaskResourceUsage", "memory", 2, MESSAGE, False, f"{DRIVERS}.MemoryUsage"),
    (f"{DRIVERS}.CPUUsage", "system_mode", 1, DOUBLE, False, None),
    (f"{DRIVERS}.CPUUsage", "user_mode", 2, DOUBLE, False, None),
    (f"{DRIVERS}.CPUUsage", "total_ticks", 3, DOUBLE, False, None),
    (f"{DRIVERS}.CPUUsage", "throttled_periods", 4, UINT64, False, None),
    (f"{DRIVERS}.CPUUsage", "throttled_time", 5, UINT64, False, None),
    (f"{DRIVERS}.CPUUsage", "percent", 6, DOUBLE, False, None),
    (f"{DRIVERS}.CPUUsage", "measured_fields", 7, ENUM, True, f"{DRIVERS}.CPUUsage.Fields"),
    (f"{DRIVERS}.MemoryUsage", "rss", 1, UINT64, False, None),
    (f"{DRIVERS}.MemoryUsage", "cache", 2, UINT64, False, None),
    (f"{DRIVERS}.MemoryUsage", "max_usage", 3, UINT64, False, None),
    (f"{DRIVERS}.MemoryUsage", "kernel_usage", 4, UINT64, False, None),
    (f"{DRIVERS}.MemoryUsage", "kernel_max_usage", 5, UINT64, False, None),
    (
        f"{DRIVERS}.MemoryUsage",
        "measured_fields",
        6,
        ENUM,
        True,
        f"{DRIVERS}.MemoryUsage.Fields",
    ),
    (f"{DRIVERS}.MemoryUsage", "usage", 7, UINT64, False, None),
    (f"{DRIVERS}.MemoryUsage", "swap", 8, UINT64, False, None),
    # Fingerprint
    (
        f"{DRIVERS}.FingerprintResponse",
        "attributes",
        1,
        MESSAGE,
        True,
        f"{DRIVERS}.FingerprintResponse.AttributesEntry",
    ),
    (
        f"{DRIVERS}.FingerprintResponse",
        "health",
        2,
        ENUM,
        False,
        f"{DRIVERS}.FingerprintResponse.HealthState",
    ),
    (f"{DRIVERS}.FingerprintResponse", "health_description", 3, STRING, False, None),
    (f"{DRIVERS}.FingerprintResponse", "err", 4, STRING, False, None),
    # Capabilities
    (
        f"{DRIVERS}.CapabilitiesResponse",
        "capabilities",
        1,
        MESSAGE,
        False,
        f"{DRIVERS}.DriverCapabilities",
    ),
    (f"{DRIVERS}.DriverCapabilities", "send_signals", 1, BOOL, False, None),
    (f"{DRIVERS}.DriverCapabilities", "exec", 2, BOOL, False, None),
    (
        f"{DRIVERS}.DriverCapabilities",
        "fs_isolation",
        3,
        ENUM,
        False,
        f"{DRIVERS}.DriverCapabilities.FSIsolation",
    ),
    (
        f"{DRIVERS}.DriverCapabilities",
        "network_isolation_modes",
        4,
        ENUM,
        True,
        f"{DRIVERS}.NetworkIsolationSpec.NetworkIsolationMode",
    ),
    (f"{DRIVERS}.DriverCapabilities", "must_create_network", 5, BOOL, False, None),
    (
        f"{DRIVERS}.DriverCapabilities",
        "mount_configs",
        6,
        ENUM,
        False,
        f"{DRIVERS}.DriverCapabilities.MountConfigs",
    ),
    (f"{DRIVERS}.DriverCapabilities", "disable_log_collection", 8, BOOL, False, None),
    (f"{DRIVERS}.DriverCapabilities", "dynamic_workload_users", 9, BOOL, False, None),
    # Events
    (f"{DRIVERS}.DriverTaskEvent", "task_id", 1, STRING, False, None),
    (f"{DRIVERS}.DriverTaskEvent", "alloc_id", 2, STRING, False, None),
    (f"{DRIVERS}.DriverTaskEvent", "task_name", 3, STRING, False, None),
    (
        f"{DRIVERS}.DriverTaskEvent",
        "timestamp",
        4,
        MESSAGE,
        False,
        "google.protobuf.Timestamp",
    ),
    (f"{DRIVERS}.DriverTaskEvent", "message", 5, STRING, False, None),
    (
        f"{DRIVERS}.DriverTaskEvent",
        "annotations",
        6,
        MESSAGE,
        True,
        f"{DRIVERS}.DriverTaskEvent.AnnotationsEntry",
    ),
    # Schema responses
    (f"{DRIVERS}.TaskConfigSchemaResponse", "spec", 1, MESSAGE, False, f"{HCLSPEC}.Spec"),
    (f"{BASE}.ConfigSchemaResponse", "spec", 1, MESSAGE, False, f"{HCLSPEC}.Spec"),
    # Base plugin
    (f"{BASE}.PluginInfoResponse", "type", 1, ENUM, False, f"{BASE}.PluginType"),
    (f"{BASE}.PluginInfoResponse", "plugin_api_versions", 2, STRING, True, None),
    (f"{BASE}.PluginInfoResponse", "plugin_version", 3, STRING, False, None),
    (f"{BASE}.PluginInfoResponse", "name", 4, STRING, False, None),
    (f"{BASE}.SetConfigRequest", "msgpack_config", 1, BYTES, False, None),
    (f"{BASE}.SetConfigRequest", "nomad_config", 2, MESSAGE, False, f"{BASE}.NomadConfig"),
    (f"{BASE}.SetConfigRequest", "plugin_api_version", 3, STRING, False, None),
    (f"{BASE}.NomadConfig", "driver", 1, MESSAGE, False, f"{BASE}.NomadDriverConfig"),
    (f"{BASE}.NomadDriverConfig", "ClientMaxPort", 1, UINT32, False, None),
    (f"{BASE}.NomadDriverConfig", "ClientMinPort", 2, UINT32, False, None),
    (f"{BASE}.NomadDriverConfig", "Topology", 3, MESSAGE, False, f"{BASE}.ClientTopology"),
    (f"{BASE}.ClientTopologyCore", "core_grade", 4, ENUM, False, f"{BASE}.CoreGrade"),
    # Attribute
    (f"{STRUCTS}.Attribute", "float_val", 1, DOUBLE, False, None),
    (f"{STRUCTS}.Attribute", "int_val", 2, INT64, False, None),
    (f"{STRUCTS}.Attribute", "string_val", 3, STRING, False, None),
    (f"{STRUCTS}.Attribute", "bool_val", 4, BOOL, False, None),
    (f"{STRUCTS}.Attribute", "unit", 5, STRING, False, None),
    (f"{STRUCTS}.RecoverableError", "recoverable", 1, BOOL, False, None),
    # go-plugin
    ("plugin.StdioData", "channel", 1, ENUM, False, "plugin.StdioData.Channel"),
    ("plugin.StdioData", "data", 2, BYTES, False, None),
    ("plugin.ConnInfo", "service_id", 1, UINT32, False, None),
    ("plugin.ConnInfo", "network", 2, STRING, False, None),
    ("plugin.ConnInfo", "address", 3, STRING, False, None),
    ("plugin.ConnInfo", "knock", 4, MESSAGE, False, "plugin.ConnInfo.Knock"),
    ("plugin.ConnInfo.Knock", "knock", 1, BOOL, False, None),
    ("plugin.ConnInfo.Knock", "ack", 2, BOOL, False, None),
    ("plugin.ConnInfo.Knock", "error", 3, STRING, False, None),
]


def _message(full_name: str) -> _d.Descriptor:
    # All generated modules register into the default descriptor pool.
    desc: _d.Descriptor = driver_pb2.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
    return desc


def _msg_type(f: _d.FieldDescriptor) -> _d.Descriptor:
    assert f.message_type is not None, f.full_name
    return f.message_type


def _is_repeated(f: _d.FieldDescriptor) -> bool:
    # protobuf 7 dropped FieldDescriptor.label in favour of is_repeated.
    if hasattr(f, "is_repeated"):
        return bool(f.is_repeated)
    return bool(getattr(f, "label") == FD.LABEL_REPEATED)  # noqa: B009


def _field_type_name(f: _d.FieldDescriptor) -> str | None:
    if f.type == MESSAGE:
        return _msg_type(f).full_name
    if f.type == ENUM:
        assert f.enum_type is not None
        return f.enum_type.full_name
    return None


@pytest.mark.parametrize(
    ("message", "field", "number", "ftype", "repeated", "type_name"),
    FIELDS,
    ids=[f"{m.rsplit('.', 1)[-1]}.{f}" for m, f, *_ in FIELDS],
)
def test_field(
    message: str, field: str, number: int, ftype: int, repeated: bool, type_name: str | None
) -> None:
    desc = _message(message)
    f = desc.fields_by_name[field]
    assert f.number == number
    assert f.type == ftype
    assert _is_repeated(f) is repeated
    if type_name is not None:
        assert _field_type_name(f) == type_name


def test_map_fields_have_expected_value_types() -> None:
    attrs = _message(f"{DRIVERS}.FingerprintResponse").fields_by_name["attributes"]
    assert _msg_type(attrs).GetOptions().map_entry
    assert _msg_type(_msg_type(attrs).fields_by_name["value"]).full_name == (f"{STRUCTS}.Attribute")
    port_map = _message(f"{DRIVERS}.NetworkOverride").fields_by_name["port_map"]
    assert _msg_type(port_map).fields_by_name["value"].type == INT32
    by_pid = _message(f"{DRIVERS}.TaskStats").fields_by_name["resource_usage_by_pid"]
    assert _msg_type(_msg_type(by_pid).fields_by_name["value"]).full_name == (
        f"{DRIVERS}.TaskResourceUsage"
    )


def test_driver_capabilities_field_7_reserved() -> None:
    desc = _message(f"{DRIVERS}.DriverCapabilities")
    assert 7 not in desc.fields_by_number
    assert "remote_tasks" not in desc.fields_by_name
    # The reservation itself is only visible in the serialized file descriptor.
    from google.protobuf import descriptor_pb2

    fdp = descriptor_pb2.FileDescriptorProto()
    driver_pb2.DESCRIPTOR.CopyToProto(fdp)
    (caps,) = [m for m in fdp.message_type if m.name == "DriverCapabilities"]
    assert [(r.start, r.end) for r in caps.reserved_range] == [(7, 8)]
    assert list(caps.reserved_name) == ["remote_tasks"]
    (linux,) = [m for m in fdp.message_type if m.name == "LinuxResources"]
    assert [(r.start, r.end) for r in linux.reserved_range] == [(7, 8)]
    assert list(linux.reserved_name) == ["cpuset_mems"]


# --------------------------------------------------------------------------------------
# Enums


def _enum_values(e: _d.EnumDescriptor) -> dict[str, int]:
    return {v.name: v.number for v in e.values}


ENUMS: dict[str, dict[str, int]] = {
    f"{BASE}.PluginType": {"UNKNOWN": 0, "DRIVER": 2, "DEVICE": 3},
    f"{BASE}.CoreGrade": {"Performance": 0, "Efficiency": 1},
    f"{DRIVERS}.TaskState": {"UNKNOWN": 0, "RUNNING": 1, "EXITED": 2},
    f"{DRIVERS}.FingerprintResponse.HealthState": {
        "UNDETECTED": 0,
        "UNHEALTHY": 1,
        "HEALTHY": 2,
    },
    f"{DRIVERS}.StartTaskResponse.Result": {"SUCCESS": 0, "RETRY": 1, "FATAL": 2},
    f"{DRIVERS}.DriverCapabilities.FSIsolation": {
        "NONE": 0,
        "CHROOT": 1,
        "IMAGE": 2,
        "UNVEIL": 3,
    },
    f"{DRIVERS}.DriverCapabilities.MountConfigs": {
        "UNKNOWN_MOUNTS": 0,
        "ANY_MOUNTS": 0,
        "NO_MOUNTS": 1,
    },
    f"{DRIVERS}.NetworkIsolationSpec.NetworkIsolationMode": {
        "HOST": 0,
        "GROUP": 1,
        "TASK": 2,
        "NONE": 3,
    },
    f"{DRIVERS}.CPUUsage.Fields": {
        "SYSTEM_MODE": 0,
        "USER_MODE": 1,
        "TOTAL_TICKS": 2,
        "THROTTLED_PERIODS": 3,
        "THROTTLED_TIME": 4,
        "PERCENT": 5,
    },
    f"{DRIVERS}.MemoryUsage.Fields": {
        "RSS": 0,
        "CACHE": 1,
        "MAX_USAGE": 2,
        "KERNEL_USAGE": 3,
        "KERNEL_MAX_USAGE": 4,
        "USAGE": 5,
        "SWAP": 6,
    },
    "plugin.StdioData.Channel": {"INVALID": 0, "STDOUT": 1, "STDERR": 2},
}


@pytest.mark.parametrize("full_name", sorted(ENUMS))
def test_enum(full_name: str) -> None:
    enum = driver_pb2.DESCRIPTOR.pool.FindEnumTypeByName(full_name)
    assert _enum_values(enum) == ENUMS[full_name]


# --------------------------------------------------------------------------------------
# hclspec, Attribute, RecoverableError


def test_spec_oneof_members() -> None:
    spec = hclspec_pb2.Spec.DESCRIPTOR
    assert list(spec.oneofs_by_name) == ["block"]
    members = [
        (f.name, f.number, _msg_type(f).full_name) for f in spec.oneofs_by_name["block"].fields
    ]
    assert members == [
        ("object", 1, f"{HCLSPEC}.Object"),
        ("array", 2, f"{HCLSPEC}.Array"),
        ("Attr", 3, f"{HCLSPEC}.Attr"),
        ("block_value", 4, f"{HCLSPEC}.Block"),
        ("block_attrs", 5, f"{HCLSPEC}.BlockAttrs"),
        ("block_list", 6, f"{HCLSPEC}.BlockList"),
        ("block_set", 7, f"{HCLSPEC}.BlockSet"),
        ("block_map", 8, f"{HCLSPEC}.BlockMap"),
        ("default", 9, f"{HCLSPEC}.Default"),
        ("literal", 10, f"{HCLSPEC}.Literal"),
    ]


def test_spec_member_messages() -> None:
    def fields(msg: type) -> list[tuple[str, int, int]]:
        return [(f.name, f.number, f.type) for f in msg.DESCRIPTOR.fields]  # type: ignore[attr-defined]

    assert fields(hclspec_pb2.Attr) == [
        ("name", 1, STRING),
        ("type", 2, STRING),
        ("required", 3, BOOL),
    ]
    assert fields(hclspec_pb2.Block) == [
        ("name", 1, STRING),
        ("required", 2, BOOL),
        ("nested", 3, MESSAGE),
    ]
    assert fields(hclspec_pb2.BlockAttrs) == [
        ("name", 1, STRING),
        ("type", 2, STRING),
        ("required", 3, BOOL),
    ]
    for msg in (hclspec_pb2.BlockList, hclspec_pb2.BlockSet):
        assert fields(msg) == [
            ("name", 1, STRING),
            ("min_items", 2, UINT64),
            ("max_items", 3, UINT64),
            ("nested", 4, MESSAGE),
        ]
    assert fields(hclspec_pb2.BlockMap) == [
        ("name", 1, STRING),
        ("labels", 2, STRING),
        ("nested", 3, MESSAGE),
    ]
    assert fields(hclspec_pb2.Default) == [("primary", 1, MESSAGE), ("default", 2, MESSAGE)]
    assert fields(hclspec_pb2.Literal) == [("value", 1, STRING)]
    assert fields(hclspec_pb2.Object) == [("attributes", 1, MESSAGE)]
    assert fields(hclspec_pb2.Array) == [("values", 1, MESSAGE)]


def test_attribute_oneof() -> None:
    desc = attribute_pb2.Attribute.DESCRIPTOR
    assert desc.full_name == f"{STRUCTS}.Attribute"
    assert [f.name for f in desc.oneofs_by_name["value"].fields] == [
        "float_val",
        "int_val",
        "string_val",
        "bool_val",
    ]
    assert desc.fields_by_name["unit"].containing_oneof is None


def test_recoverable_error_any_type_url() -> None:
    err = recoverable_error_pb2.RecoverableError(recoverable=True)
    assert err.DESCRIPTOR.full_name == f"{STRUCTS}.RecoverableError"
    packed = Any()
    packed.Pack(err)
    assert packed.type_url == f"type.googleapis.com/{STRUCTS}.RecoverableError"
    # The exact bytes Nomad's Go side expects for recoverable=true: field 1, varint, 1.
    assert packed.value == b"\x08\x01"


def test_recoverable_error_and_attribute_share_nomad_package() -> None:
    assert recoverable_error_pb2.DESCRIPTOR.package == STRUCTS
    assert attribute_pb2.DESCRIPTOR.package == STRUCTS
    assert hclspec_pb2.DESCRIPTOR.package == HCLSPEC
    assert base_pb2.DESCRIPTOR.package == BASE
    assert driver_pb2.DESCRIPTOR.package == DRIVERS
    assert goplugin_pb2.DESCRIPTOR.package == "plugin"


# --------------------------------------------------------------------------------------
# Round trips


def _sample_task_config() -> driver_pb2.TaskConfig:
    return driver_pb2.TaskConfig(
        id="3f1e8a52-0000-4000-8000-000000000001/web/0a1b2c3d",
        name="web",
        msgpack_driver_config=b"\x81\xa5image\xa8disk.img",
        env={"NOMAD_TASK_NAME": "web", "FOO": "bar"},
        device_env={"NVIDIA_VISIBLE_DEVICES": "0"},
        resources=driver_pb2.Resources(
            allocated_resources=driver_pb2.AllocatedTaskResources(
                cpu=driver_pb2.AllocatedCpuResources(cpu_shares=500),
                memory=driver_pb2.AllocatedMemoryResources(memory_mb=256, memory_max_mb=512),
                networks=[
                    driver_pb2.NetworkResource(
                        device="eth0",
                        ip="10.0.0.5",
                        mbits=10,
                        dynamic_ports=[driver_pb2.NetworkPort(label="http", value=23456)],
                    )
                ],
            ),
            linux_resources=driver_pb2.LinuxResources(
                cpu_shares=500,
                memory_limit_bytes=512 * 1024 * 1024,
                cpuset_cpus="0,1",
                PercentTicks=0.25,
                cpuset_cgroup="/nomad.slice/share.slice",
            ),
            ports=[driver_pb2.PortMapping(label="http", value=23456, to=8080, host_ip="10.0.0.5")],
        ),
        mounts=[
            driver_pb2.Mount(
                task_path="/data", host_path="/srv/data", readonly=True, request_name="data"
            )
        ],
        devices=[
            driver_pb2.Device(task_path="/dev/kvm", host_path="/dev/kvm", cgroup_permissions="rw")
        ],
        user="nomad-80000",
        alloc_dir="/var/lib/nomad/alloc/3f1e8a52",
        stdout_path="/var/lib/nomad/alloc/3f1e8a52/alloc/logs/.web.stdout.fifo",
        stderr_path="/var/lib/nomad/alloc/3f1e8a52/alloc/logs/.web.stderr.fifo",
        task_group_name="g",
        job_name="j",
        alloc_id="3f1e8a52-0000-4000-8000-000000000001",
        network_isolation_spec=driver_pb2.NetworkIsolationSpec(
            mode=driver_pb2.NetworkIsolationSpec.GROUP,
            path="/var/run/netns/3f1e8a52",
            labels={"docker_sandbox_container_id": "x"},
            hostsConfig=driver_pb2.HostsConfig(hostname="web", address="172.26.64.2"),
        ),
        dns=driver_pb2.DNSConfig(servers=["1.1.1.1"], searches=["svc"], options=["ndots:2"]),
        job_id="j",
        namespace="default",
        node_name="n1",
        node_id="node-uuid",
        parent_job_id="",
    )


def test_task_config_round_trip() -> None:
    cfg = _sample_task_config()
    data = cfg.SerializeToString()
    back = driver_pb2.TaskConfig.FromString(data)
    assert back == cfg
    assert back.resources.allocated_resources.memory.memory_max_mb == 512
    assert back.resources.allocated_resources.cpu.cpu_shares == 500
    assert back.resources.linux_resources.PercentTicks == 0.25
    assert back.resources.ports[0].to == 8080
    assert back.resources.allocated_resources.networks[0].dynamic_ports[0].value == 23456
    assert back.network_isolation_spec.hostsConfig.address == "172.26.64.2"
    assert back.env["FOO"] == "bar"
    assert back.mounts[0].request_name == "data"


def test_task_config_wire_tags() -> None:
    # Hand-check a few tags: id is field 1 (0x0a), resources field 6 (0x32),
    # parent_job_id field 22 (0xb2 0x01), all length-delimited.
    assert driver_pb2.TaskConfig(id="a").SerializeToString() == b"\x0a\x01a"
    res = driver_pb2.TaskConfig(
        resources=driver_pb2.Resources(
            allocated_resources=driver_pb2.AllocatedTaskResources(
                memory=driver_pb2.AllocatedMemoryResources(memory_mb=1)
            )
        )
    ).SerializeToString()
    # Resources(6) > AllocatedTaskResources(1) > AllocatedMemoryResources(2) > memory_mb(2)=1
    assert res == b"\x32\x06\x0a\x04\x12\x02\x10\x01"
    assert driver_pb2.TaskConfig(parent_job_id="p").SerializeToString() == b"\xb2\x01\x01p"


def test_task_handle_and_wait_response_round_trip() -> None:
    handle = driver_pb2.TaskHandle(
        version=1,
        config=_sample_task_config(),
        state=driver_pb2.RUNNING,
        driver_state=b"\x81\xa3pid\xcd\x30\x39",
    )
    assert driver_pb2.TaskHandle.FromString(handle.SerializeToString()) == handle
    resp = driver_pb2.WaitTaskResponse(
        result=driver_pb2.ExitResult(exit_code=137, signal=9, oom_killed=True), err=""
    )
    assert driver_pb2.WaitTaskResponse.FromString(resp.SerializeToString()) == resp
    # An all-zero ExitResult must still be present on the wire (Nomad <= 1.11.2 derefs it).
    empty = driver_pb2.WaitTaskResponse(result=driver_pb2.ExitResult())
    assert empty.HasField("result")
    assert empty.SerializeToString() == b"\x0a\x00"


def test_stats_and_fingerprint_round_trip() -> None:
    ts = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=5)
    stats = driver_pb2.TaskStatsResponse(
        stats=driver_pb2.TaskStats(
            id="t",
            timestamp=ts,
            agg_resource_usage=driver_pb2.TaskResourceUsage(
                cpu=driver_pb2.CPUUsage(
                    percent=12.5,
                    total_ticks=250.0,
                    measured_fields=[driver_pb2.CPUUsage.PERCENT, driver_pb2.CPUUsage.TOTAL_TICKS],
                ),
                memory=driver_pb2.MemoryUsage(
                    rss=1 << 30, measured_fields=[driver_pb2.MemoryUsage.RSS]
                ),
            ),
        )
    )
    assert driver_pb2.TaskStatsResponse.FromString(stats.SerializeToString()) == stats

    fp = driver_pb2.FingerprintResponse(
        attributes={
            "driver.vm": attribute_pb2.Attribute(bool_val=True),
            "driver.vm.version": attribute_pb2.Attribute(string_val="0.1.0"),
            "driver.vm.cpu": attribute_pb2.Attribute(int_val=3000, unit="MHz"),
        },
        health=driver_pb2.FingerprintResponse.HEALTHY,
        health_description="Healthy",
    )
    back = driver_pb2.FingerprintResponse.FromString(fp.SerializeToString())
    assert back == fp
    assert back.attributes["driver.vm.cpu"].WhichOneof("value") == "int_val"

    stop = driver_pb2.StopTaskRequest(
        task_id="t", timeout=duration_pb2.Duration(seconds=5), signal="SIGTERM"
    )
    assert driver_pb2.StopTaskRequest.FromString(stop.SerializeToString()) == stop


def test_spec_round_trip() -> None:
    spec = hclspec_pb2.Spec(
        object=hclspec_pb2.Object(
            attributes={
                "image": hclspec_pb2.Spec(
                    Attr=hclspec_pb2.Attr(name="image", type="string", required=True)
                ),
                "accel": hclspec_pb2.Spec(
                    default=hclspec_pb2.Default(
                        primary=hclspec_pb2.Spec(
                            Attr=hclspec_pb2.Attr(name="accel", type="string")
                        ),
                        default=hclspec_pb2.Spec(literal=hclspec_pb2.Literal(value='"kvm"')),
                    )
                ),
                "disk": hclspec_pb2.Spec(
                    block_list=hclspec_pb2.BlockList(
                        name="disk",
                        nested=hclspec_pb2.Spec(
                            object=hclspec_pb2.Object(
                                attributes={
                                    "path": hclspec_pb2.Spec(
                                        Attr=hclspec_pb2.Attr(type="string", required=True)
                                    )
                                }
                            )
                        ),
                    )
                ),
            }
        )
    )
    back = hclspec_pb2.Spec.FromString(spec.SerializeToString())
    assert back == spec
    assert back.WhichOneof("block") == "object"
    assert back.object.attributes["image"].WhichOneof("block") == "Attr"
    assert back.object.attributes["accel"].WhichOneof("block") == "default"
    # Default.default (field 2) is reachable by its Nomad name despite being a Python-ish word.
    assert back.object.attributes["accel"].default.default.literal.value == '"kvm"'
