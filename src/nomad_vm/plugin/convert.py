"""Protobuf <-> domain types. The only place that knows both shapes.

Several response fields are dereferenced by Nomad without a nil check (protocol notes §4.11):
the builders here always set them (ExitResult, TaskStats.agg_resource_usage, timestamps).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from nomad_vm.driver.types import (
    AgentInfo,
    AttributeValue,
    Capabilities,
    ExitResult,
    Fingerprint,
    NetworkOverride,
    PortMapping,
    TaskConfig,
    TaskEvent,
    TaskHandle,
    TaskMount,
    TaskResources,
    TaskState,
    TaskStats,
    TaskStatus,
)
from nomad_vm.plugin import ctymsgpack
from nomad_vm.plugin.proto import attribute_pb2, base_pb2, driver_pb2

# Go's zero time.Time, which Nomad uses for "not finished yet".
GO_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)


def timestamp(when: datetime | None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when or GO_ZERO_TIME)
    return ts


def agent_info(cfg: base_pb2.NomadConfig) -> AgentInfo:
    driver = cfg.driver
    speeds = [
        c.base_speed or c.guess_speed or c.max_speed for c in driver.Topology.cores if not c.disable
    ]
    return AgentInfo(
        client_min_port=driver.ClientMinPort,
        client_max_port=driver.ClientMaxPort,
        core_mhz=max(speeds) if speeds else 0,
        core_count=len(speeds),
    )


def decode_config(data: bytes) -> Mapping[str, object] | None:
    value = ctymsgpack.decode(data)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ctymsgpack.CtyDecodeError("config", "expected an object")
    return value


def task_config(pb: driver_pb2.TaskConfig) -> TaskConfig:
    res = pb.resources
    alloc = res.allocated_resources
    return TaskConfig(
        id=pb.id,
        name=pb.name,
        alloc_id=pb.alloc_id,
        alloc_dir=pb.alloc_dir,
        stdout_path=pb.stdout_path,
        stderr_path=pb.stderr_path,
        resources=TaskResources(
            cpu_mhz=alloc.cpu.cpu_shares or res.linux_resources.cpu_shares,
            memory_mb=alloc.memory.memory_mb,
            cpuset_cpus=res.linux_resources.cpuset_cpus,
            memory_max_mb=alloc.memory.memory_max_mb,
        ),
        # Empty after an agent restart (Nomad does not persist it); recovery does not need it.
        driver_config=decode_config(pb.msgpack_driver_config) if pb.msgpack_driver_config else None,
        env=dict(pb.env),
        mounts=tuple(
            TaskMount(m.task_path, m.host_path, m.readonly, m.request_name) for m in pb.mounts
        ),
        job_name=pb.job_name,
        task_group_name=pb.task_group_name,
        namespace=pb.namespace,
        ports=tuple(PortMapping(p.label, p.value, p.to, p.host_ip) for p in res.ports),
        netns_path=group_netns_path(pb.network_isolation_spec),
    )


def group_netns_path(spec: driver_pb2.NetworkIsolationSpec) -> str:
    """The allocation's network namespace when the task is to run in it (GROUP mode), else "".

    HOST (the default, also when Nomad sends no spec) and NONE/TASK (never advertised, so
    never sent) leave the task on the plugin's own networking."""
    if spec.mode == driver_pb2.NetworkIsolationSpec.GROUP:
        return spec.path
    return ""


def attribute(value: AttributeValue) -> attribute_pb2.Attribute:
    if isinstance(value, bool):
        return attribute_pb2.Attribute(bool_val=value)
    if isinstance(value, int):
        return attribute_pb2.Attribute(int_val=value)
    if isinstance(value, float):
        return attribute_pb2.Attribute(float_val=value)
    return attribute_pb2.Attribute(string_val=value)


def fingerprint(fp: Fingerprint) -> driver_pb2.FingerprintResponse:
    resp = driver_pb2.FingerprintResponse(
        health=fp.health.value,  # type: ignore[arg-type]
        health_description=fp.description,
    )
    for key, value in fp.attributes.items():
        resp.attributes[key].CopyFrom(attribute(value))
    return resp


_FS_ISOLATION = {"none": 0, "chroot": 1, "image": 2, "unveil": 3}
_NET_MODES = {"host": 0, "group": 1, "task": 2, "none": 3}


def capabilities(caps: Capabilities) -> driver_pb2.DriverCapabilities:
    return driver_pb2.DriverCapabilities(
        send_signals=caps.send_signals,
        exec=caps.exec,
        fs_isolation=_FS_ISOLATION[caps.fs_isolation],  # type: ignore[arg-type]
        network_isolation_modes=[_NET_MODES[m] for m in caps.network_isolation_modes],  # type: ignore[misc]
        must_create_network=False,
        mount_configs=0 if caps.mount_configs_supported else 1,  # type: ignore[arg-type]
    )


def handle(h: TaskHandle, config: driver_pb2.TaskConfig) -> driver_pb2.TaskHandle:
    return driver_pb2.TaskHandle(
        version=h.version,
        config=config,
        state=h.state.value,  # type: ignore[arg-type]
        driver_state=h.driver_state,
    )


def handle_from(pb: driver_pb2.TaskHandle) -> TaskHandle:
    return TaskHandle(pb.version, TaskState(pb.state), pb.driver_state)


def exit_result(r: ExitResult) -> driver_pb2.ExitResult:
    return driver_pb2.ExitResult(exit_code=r.exit_code, signal=r.signal, oom_killed=r.oom_killed)


def task_status(s: TaskStatus) -> driver_pb2.InspectTaskResponse:
    status = driver_pb2.TaskStatus(
        id=s.id,
        name=s.name,
        state=s.state.value,  # type: ignore[arg-type]
        started_at=timestamp(s.started_at),
        completed_at=timestamp(s.completed_at),
        result=exit_result(s.result or ExitResult()),
    )
    return driver_pb2.InspectTaskResponse(
        task=status, driver=driver_pb2.TaskDriverStatus(attributes=dict(s.attributes))
    )


def task_stats(s: TaskStats) -> driver_pb2.TaskStatsResponse:
    cpu = driver_pb2.CPUUsage(
        user_mode=s.cpu.user_mode,
        system_mode=s.cpu.system_mode,
        total_ticks=s.cpu.total_ticks,
        percent=s.cpu.percent,
        measured_fields=[driver_pb2.CPUUsage.Fields.Value(n) for n in s.cpu.measured],
    )
    mem = driver_pb2.MemoryUsage(
        rss=s.memory.rss,
        usage=s.memory.usage,
        measured_fields=[driver_pb2.MemoryUsage.Fields.Value(n) for n in s.memory.measured],
    )
    stats = driver_pb2.TaskStats(
        id=s.task_id,
        timestamp=timestamp(s.timestamp),
        agg_resource_usage=driver_pb2.TaskResourceUsage(cpu=cpu, memory=mem),
    )
    return driver_pb2.TaskStatsResponse(stats=stats)


def task_event(e: TaskEvent) -> driver_pb2.DriverTaskEvent:
    return driver_pb2.DriverTaskEvent(
        task_id=e.task_id,
        alloc_id=e.alloc_id,
        task_name=e.task_name,
        timestamp=timestamp(e.timestamp),
        message=e.message,
        annotations=dict(e.annotations),
    )


def network_override(net: NetworkOverride) -> driver_pb2.NetworkOverride:
    # auto_advertise: services with address_mode "auto" use the VM's address, not the host's.
    return driver_pb2.NetworkOverride(
        addr=net.address, port_map=dict(net.port_map), auto_advertise=True
    )
