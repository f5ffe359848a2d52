"""A typed model of the parts of Cloud Hypervisor's REST API this backend uses.

Written from CH's OpenAPI document (``vmm/src/api/openapi/cloud-hypervisor.yaml``: the schemas
``VmConfig``, ``PayloadConfig``, ``CpusConfig``, ``MemoryConfig``, ``DiskConfig``, ``NetConfig``,
``FsConfig``, ``ConsoleConfig``/``SerialConfig``, ``BalloonConfig``, ``RngConfig``,
``VsockConfig``, ``VmCounters``, ``VmInfo``, ``VmSnapshotConfig``, ``RestoreConfig``,
``VmState`` and ``VmmPingResponse``), keeping only the properties we set or read. Field names
are the API's own, so ``to_json`` is a plain walk.

``from_json`` reads a document back into the model. Strict (the fake API server, checking what
our client sends): unknown properties, missing required ones and wrong types are errors, as a
typo in our request would silently be a default in CH. Lenient (reading CH's answers): unknown
properties are ignored, since CH's replies carry far more than we model.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class ModelError(ValueError):
    """A document does not match the model; ``path`` says where (``payload.kernel``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path or 'body'}: {reason}")
        self.path = path


class ConsoleMode(enum.Enum):
    OFF = "Off"
    PTY = "Pty"
    TTY = "Tty"
    FILE = "File"
    SOCKET = "Socket"
    NULL = "Null"


class ImageType(enum.Enum):
    FIXED_VHD = "FixedVhd"
    QCOW2 = "Qcow2"
    RAW = "Raw"
    VHDX = "Vhdx"
    UNKNOWN = "Unknown"


class VmState(enum.Enum):
    CREATED = "Created"
    RUNNING = "Running"
    SHUTDOWN = "Shutdown"
    PAUSED = "Paused"
    BREAK_POINT = "BreakPoint"


@dataclass(frozen=True)
class PayloadConfig:
    """What the VM boots: a kernel (with initramfs and command line) or a firmware."""

    kernel: str | None = None
    cmdline: str | None = None
    initramfs: str | None = None
    firmware: str | None = None


@dataclass(frozen=True)
class CpusConfig:
    boot_vcpus: int
    max_vcpus: int


@dataclass(frozen=True)
class MemoryConfig:
    # Bytes.
    size: int
    # Guest RAM mapped shared: needed by vhost-user devices (virtio-fs) to reach it.
    shared: bool = False


@dataclass(frozen=True)
class DiskConfig:
    path: str
    readonly: bool = False
    image_type: ImageType | None = None
    # CH refuses qcow2 backing files unless told (a guest-controlled header could name any
    # host file); our overlays are ours, their backing chain checked by the driver.
    backing_files: bool = False
    id: str | None = None


@dataclass(frozen=True)
class NetConfig:
    tap: str | None = None
    mac: str | None = None
    # Queues, not pairs: 2 is one RX/TX pair, which a single-queue TAP accepts.
    num_queues: int = 2
    id: str | None = None


@dataclass(frozen=True)
class FsConfig:
    tag: str
    socket: str
    num_queues: int = 1
    queue_size: int = 1024
    id: str | None = None


@dataclass(frozen=True)
class ConsoleConfig:
    """The virtio-console (``console``) or the legacy serial port (``serial``)."""

    mode: ConsoleMode
    file: str | None = None
    socket: str | None = None


@dataclass(frozen=True)
class BalloonConfig:
    # Bytes taken from the guest; 0 leaves it all its memory.
    size: int
    deflate_on_oom: bool = False
    free_page_reporting: bool = False


@dataclass(frozen=True)
class RngConfig:
    src: str


@dataclass(frozen=True)
class VsockConfig:
    """A virtio-vsock device whose host side is a unix socket CH listens on (hybrid vsock)."""

    # The guest's context id (3 or more); the device is CH's own, not the host kernel's, so
    # every VM may have the same one.
    cid: int
    socket: str
    id: str | None = None


@dataclass(frozen=True)
class VmConfig:
    payload: PayloadConfig
    cpus: CpusConfig | None = None
    memory: MemoryConfig | None = None
    disks: tuple[DiskConfig, ...] | None = None
    net: tuple[NetConfig, ...] | None = None
    fs: tuple[FsConfig, ...] | None = None
    serial: ConsoleConfig | None = None
    console: ConsoleConfig | None = None
    rng: RngConfig | None = None
    balloon: BalloonConfig | None = None
    vsock: VsockConfig | None = None
    pvpanic: bool = False


@dataclass(frozen=True)
class VmInfo:
    config: VmConfig
    state: VmState
    memory_actual_size: int | None = None


@dataclass(frozen=True)
class VmSnapshotConfig:
    # file://<directory>: an existing, empty directory (relative: to the VMM's working one).
    destination_url: str


@dataclass(frozen=True)
class RestoreConfig:
    source_url: str
    # Read all of guest memory in at once rather than as the guest touches it.
    prefault: bool = False


@dataclass(frozen=True)
class VmmPingResponse:
    version: str
    build_version: str | None = None
    pid: int | None = None
    features: tuple[str, ...] = ()


# VmCounters: device id -> counter name -> value (int64 in the OpenAPI document). Block devices
# count read_bytes, write_bytes, read_ops, write_ops and latencies; net devices rx_bytes,
# rx_frames, tx_bytes, tx_frames. Device ids are the ``id`` we give each device (disk0, net0).
DeviceCounters = dict[str, dict[str, int]]
INT64_MAX = 2**63 - 1


def parse_counters(data: object) -> DeviceCounters:
    """A ``vm.counters`` reply; ModelError naming the device and counter that is not one."""
    if not isinstance(data, dict):
        raise ModelError("", f"must be an object (VmCounters), got {_kind(data)}")
    counters: DeviceCounters = {}
    for device, values in data.items():
        if not isinstance(values, dict):
            raise ModelError(str(device), f"must be an object of counters, got {_kind(values)}")
        parsed = {}
        for name, value in values.items():
            where = _join(str(device), str(name))
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelError(where, f"must be an integer, got {_kind(value)}")
            if not 0 <= value <= INT64_MAX:
                raise ModelError(where, f"must be a counter (0 to 2^63-1), got {value}")
            parsed[str(name)] = value
        counters[str(device)] = parsed
    return counters


# Minimums the OpenAPI document states (CpusConfig.boot_vcpus/max_vcpus).
MINIMUMS = {
    ("CpusConfig", "boot_vcpus"): 1,
    ("CpusConfig", "max_vcpus"): 1,
    ("VsockConfig", "cid"): 3,
}


def to_json(value: Any) -> Any:
    """The API document for a model value: unset (None) properties are left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is not None:
                out[f.name] = to_json(item)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    return value


def from_json(cls: type[T], data: object, *, strict: bool, path: str = "") -> T:
    """``data`` (decoded JSON) as a ``cls``; ModelError naming the property when it is not."""
    if not isinstance(data, dict):
        raise ModelError(path, f"must be an object ({cls.__name__}), got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if strict:
        unknown = sorted(set(data) - set(fields))
        if unknown:
            where = _join(path, unknown[0])
            raise ModelError(where, f"is not a property of {cls.__name__} in our model")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        where = _join(path, name)
        if name not in data or data[name] is None:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise ModelError(where, f"is required by {cls.__name__}")
            continue
        values[name] = _value(hints[name], data[name], strict, where)
        minimum = MINIMUMS.get((cls.__name__, name))
        if minimum is not None and values[name] < minimum:
            raise ModelError(where, f"must be at least {minimum}, got {values[name]}")
    return cls(**values)


def _value(hint: Any, data: object, strict: bool, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, _UNION_TYPE):
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, data, strict, path)
    if origin is tuple:
        if not isinstance(data, list):
            raise ModelError(path, f"must be an array, got {_kind(data)}")
        return tuple(_value(args[0], item, strict, f"{path}[{i}]") for i, item in enumerate(data))
    if dataclasses.is_dataclass(hint):
        return from_json(hint, data, strict=strict, path=path)  # type: ignore[arg-type]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(data)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in hint)
            raise ModelError(path, f"must be one of {allowed}, got {data!r}") from None
    if hint is bool:
        if not isinstance(data, bool):
            raise ModelError(path, f"must be a boolean, got {_kind(data)}")
        return data
    if hint is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ModelError(path, f"must be an integer, got {_kind(data)}")
        return data
    if hint is str:
        if not isinstance(data, str):
            raise ModelError(path, f"must be a string, got {_kind(data)}")
        return data
    raise TypeError(f"the model has a property of unhandled type {hint!r} at {path}")


_UNION_TYPE = type(int | None)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(data: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(data), type(data).__name__
    )
