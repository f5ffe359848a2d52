"""Plugin-layer pure logic: the status table, handshake line, conversions Nomad relies on."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_status import rpc_status

from nomad_vm import errors
from nomad_vm.driver.types import (
    CpuUsage,
    ExitResult,
    Fingerprint,
    Health,
    MemoryUsage,
    TaskState,
    TaskStats,
    TaskStatus,
)
from nomad_vm.plugin import convert, handshake
from nomad_vm.plugin.launcher import Handshake
from nomad_vm.plugin.proto import driver_pb2, recoverable_error_pb2
from nomad_vm.plugin.status import classify, to_status


@pytest.mark.parametrize(
    ("exc", "code", "recoverable"),
    [
        (errors.ConfigError("config.kernel", "x"), grpc.StatusCode.INVALID_ARGUMENT, False),
        (errors.ImageError("config.kernel", "x"), grpc.StatusCode.INVALID_ARGUMENT, False),
        (errors.TaskNotFound("t"), grpc.StatusCode.NOT_FOUND, False),
        (errors.LaunchError("qemu died"), grpc.StatusCode.FAILED_PRECONDITION, True),
        (errors.HypervisorError("qmp"), grpc.StatusCode.INTERNAL, True),
        (errors.Unsupported("no"), grpc.StatusCode.UNIMPLEMENTED, False),
        (ValueError("bug"), grpc.StatusCode.INTERNAL, False),
    ],
)
def test_status_table(exc: Exception, code: grpc.StatusCode, recoverable: bool) -> None:
    assert classify(exc) == (code, recoverable)
    assert code != grpc.StatusCode.UNAVAILABLE  # Nomad reads UNAVAILABLE as "plugin died"


def test_recoverable_detail_is_first_and_typed() -> None:
    status = to_status(errors.LaunchError("qemu died"), with_recoverable=True)
    proto = rpc_status.status_pb2.Status.FromString(
        dict(status.trailing_metadata)["grpc-status-details-bin"]
    )
    assert proto.message == "qemu died"
    assert proto.details[0].type_url == (
        "type.googleapis.com/hashicorp.nomad.plugins.shared.structs.RecoverableError"
    )
    detail = recoverable_error_pb2.RecoverableError()
    proto.details[0].Unpack(detail)
    assert detail.recoverable is True


def test_handshake_line_round_trips() -> None:
    from pathlib import Path

    line = handshake.handshake_line(Path("/tmp/x/plugin.sock"))
    assert line == "1|2|unix|/tmp/x/plugin.sock|grpc\n"
    parsed = Handshake.parse(line)
    assert parsed.target == "unix:/tmp/x/plugin.sock"


def test_socket_dir_is_private_and_new_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLUGIN_UNIX_SOCKET_DIR", str(tmp_path))
    first, second = handshake.make_socket_dir(), handshake.make_socket_dir()
    assert first != second and first.parent == second.parent == tmp_path
    assert all(d.name.startswith("nomad-vm-") for d in (first, second))
    assert oct(first.stat().st_mode & 0o777) == "0o700"


def test_exit_result_always_set_and_go_zero_time() -> None:
    status = TaskStatus("i", "n", TaskState.RUNNING, datetime(2026, 1, 1, tzinfo=UTC), None, None)
    resp = convert.task_status(status)
    assert resp.task.HasField("result")
    assert resp.task.completed_at.ToDatetime().year == 1
    assert resp.task.HasField("started_at")


def test_stats_always_carry_agg_usage_and_measured_fields() -> None:
    stats = TaskStats("t", datetime.now(UTC), CpuUsage(), MemoryUsage(rss=5, measured=("RSS",)))
    resp = convert.task_stats(stats)
    assert resp.stats.HasField("agg_resource_usage") and resp.stats.HasField("timestamp")
    assert list(resp.stats.agg_resource_usage.memory.measured_fields) == [
        driver_pb2.MemoryUsage.RSS
    ]
    assert list(resp.stats.agg_resource_usage.cpu.measured_fields) == []


def test_fingerprint_attribute_types() -> None:
    fp = Fingerprint(Health.HEALTHY, "ok", {"a": True, "b": 3, "c": 1.5, "d": "x"})
    resp = convert.fingerprint(fp)
    assert resp.health == driver_pb2.FingerprintResponse.HEALTHY
    assert resp.attributes["a"].bool_val is True
    assert resp.attributes["b"].int_val == 3
    assert resp.attributes["c"].float_val == 1.5
    assert resp.attributes["d"].string_val == "x"


def test_exit_result_conversion() -> None:
    pb = convert.exit_result(ExitResult(exit_code=137, signal=9))
    assert (pb.exit_code, pb.signal) == (137, 9)
