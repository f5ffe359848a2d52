"""Domain types of Nomad's task-driver contract, free of protobuf and gRPC.

The plugin layer converts protobuf messages to and from these; the driver layer works only with
them. All are frozen: a value handed across a layer cannot change under the other side.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


class Health(enum.Enum):
    UNDETECTED = 0
    UNHEALTHY = 1
    HEALTHY = 2


class TaskState(enum.Enum):
    UNKNOWN = 0
    RUNNING = 1
    EXITED = 2


AttributeValue = str | int | float | bool


@dataclass(frozen=True)
class Fingerprint:
    health: Health
    description: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    send_signals: bool = False
    exec: bool = False
    # "none": Nomad's task directory paths are host paths (the VM is not a chroot).
    fs_isolation: str = "none"
    # Nomad's NetworkIsolationMode names this driver accepts: "host" (the plugin's own bridge)
    # and "group" (a job's network { mode = "bridge" }: the allocation's network namespace).
    network_isolation_modes: tuple[str, ...] = ("host", "group")
    mount_configs_supported: bool = False


@dataclass(frozen=True)
class AgentInfo:
    """What the Nomad agent tells the plugin about the node in SetConfig."""

    client_min_port: int = 0
    client_max_port: int = 0
    # MHz of one core as Nomad fingerprinted it (0 when Nomad did not send a topology).
    core_mhz: int = 0
    core_count: int = 0


@dataclass(frozen=True)
class TaskResources:
    cpu_mhz: int
    memory_mb: int
    # Cores reserved with `resources { cores = N }`, as Nomad's cpuset list ("0,1" or "2-3").
    cpuset_cpus: str = ""
    # Nomad's `memory_max` (memory oversubscription): 0 when unset. Above ``memory_mb`` it
    # is hot-pluggable guest memory (docs/memory.md, "virtio-mem").
    memory_max_mb: int = 0


@dataclass(frozen=True)
class TaskMount:
    """A Nomad volume_mount: a host directory to appear in the task at ``task_path``."""

    task_path: str
    host_path: str
    readonly: bool
    # The group `volume` it mounts (its name), sent by Nomad 2.0.1 and later; "" before.
    request_name: str = ""


@dataclass(frozen=True)
class PortMapping:
    """A port of the group's `network` block: ``value`` is the host port Nomad allocated,
    ``to`` the port inside the task (0: the same as ``value``)."""

    label: str
    value: int
    to: int = 0
    host_ip: str = ""


@dataclass(frozen=True)
class TaskConfig:
    """One start of one task (Nomad's TaskConfig; ``id`` is new on every restart)."""

    id: str
    name: str
    alloc_id: str
    alloc_dir: str
    stdout_path: str
    stderr_path: str
    resources: TaskResources
    # The decoded `config {}` block: plain data, validated by the driver against schema.TASK_CONFIG.
    driver_config: Mapping[str, object] | None
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[TaskMount, ...] = ()
    job_name: str = ""
    task_group_name: str = ""
    # The allocation's Nomad namespace (shown by the console server; Nomad itself decides
    # who may open a console, from its own record of the allocation).
    namespace: str = ""
    ports: tuple[PortMapping, ...] = ()
    # The allocation's network namespace (a path such as /var/run/netns/<alloc id>) when the
    # group's network mode isolates it (GROUP isolation, e.g. network { mode = "bridge" });
    # empty in host mode.
    netns_path: str = ""

    @property
    def task_dir(self) -> str:
        return f"{self.alloc_dir}/{self.name}"


@dataclass(frozen=True)
class TaskHandle:
    """What StartTask/RecoverTask exchange with Nomad; ``driver_state`` is our opaque record."""

    version: int
    state: TaskState
    driver_state: bytes


@dataclass(frozen=True)
class NetworkOverride:
    """StartTask's answer about the task's own address: Nomad advertises services and runs
    checks against ``address`` and the ports in ``port_map`` (label -> port in the guest)."""

    address: str
    port_map: Mapping[str, int]


@dataclass(frozen=True)
class ExitResult:
    exit_code: int = 0
    signal: int = 0
    oom_killed: bool = False
    # Non-empty makes Nomad count the exit as failed whatever the code; says why.
    err: str = ""

    @property
    def successful(self) -> bool:
        return self.exit_code == 0 and self.signal == 0 and not self.err


@dataclass(frozen=True)
class TaskStatus:
    id: str
    name: str
    state: TaskState
    started_at: datetime
    completed_at: datetime | None
    result: ExitResult | None
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CpuUsage:
    user_mode: float = 0.0
    system_mode: float = 0.0
    total_ticks: float = 0.0
    percent: float = 0.0
    # Names of Nomad's CPUUsage.Fields enum values (e.g. "PERCENT") that hold real measurements.
    measured: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryUsage:
    rss: int = 0
    usage: int = 0
    measured: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskStats:
    task_id: str
    timestamp: datetime
    cpu: CpuUsage
    memory: MemoryUsage


@dataclass(frozen=True)
class TaskEvent:
    task_id: str
    alloc_id: str
    task_name: str
    timestamp: datetime
    message: str
    annotations: Mapping[str, str] = field(default_factory=dict)
