"""The driver_state record kept by Nomad for each task, and how it is encoded.

Nomad stores these bytes in its client state and hands them back in RecoverTask after a plugin or
agent restart; they must hold everything needed to find and clean up the VM. msgpack with string
keys keeps `nomad operator client-state` able to decode it. ``version`` lets a newer plugin read
an older record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import msgpack

from nomad_vm.errors import HypervisorError

STATE_VERSION = 1


@dataclass(frozen=True)
class DriverState:
    task_id: str
    backend: str
    pid: int
    # Process start time (seconds since the epoch): with pid, the VM's identity.
    process_start_time: float
    control_socket: str
    runtime_dir: str
    started_at: float
    version: int = STATE_VERSION
    # Where `nomad alloc signal` goes in the guest (task options; kept here because Nomad does
    # not hand the job's config back after an agent restart). Optional: older records lack them.
    signal_unit: str | None = None
    signal_pidfile: str | None = None
    # (pid, start time) of the processes serving the VM (virtiofsd), to end any left running.
    helper_processes: tuple[tuple[int, float], ...] = ()
    # The task's network on the host (driver.networking.NetworkRecord), to tear it down.
    network: dict[str, str] | None = None

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(asdict(self), use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> DriverState:
        try:
            raw = msgpack.unpackb(data, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise HypervisorError(f"driver_state is not valid msgpack: {exc}") from exc
        if not isinstance(raw, dict):
            raise HypervisorError("driver_state is not a map")
        version = raw.get("version")
        if version != STATE_VERSION:
            raise HypervisorError(
                f"driver_state version {version!r} is not supported by this plugin "
                f"(it reads version {STATE_VERSION})"
            )
        # msgpack has no tuples: give the pairs back their shape.
        raw["helper_processes"] = tuple(
            (int(pid), float(start)) for pid, start in raw.get("helper_processes", ())
        )
        try:
            return cls(**raw)
        except TypeError as exc:
            raise HypervisorError(f"driver_state has unexpected fields: {exc}") from exc
