"""The one table from domain errors to gRPC statuses.

Nomad reads few codes: UNAVAILABLE means "the plugin may have died" (never use it for ordinary
errors), and a StartTask error is retried by the restart policy only when its status carries a
RecoverableError detail. Everything else is just a message shown in task events.
"""

from __future__ import annotations

import grpc

from nomad_vm import errors

# (error type, gRPC code, recoverable when it fails a StartTask); first match wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode, bool], ...] = (
    (errors.ConfigError, grpc.StatusCode.INVALID_ARGUMENT, False),
    (errors.ImageError, grpc.StatusCode.INVALID_ARGUMENT, False),
    (errors.TaskNotFound, grpc.StatusCode.NOT_FOUND, False),
    (errors.TaskExists, grpc.StatusCode.ALREADY_EXISTS, False),
    (errors.Unsupported, grpc.StatusCode.UNIMPLEMENTED, False),
    (errors.CommandNotRunnable, grpc.StatusCode.INVALID_ARGUMENT, False),
    (errors.LaunchError, grpc.StatusCode.FAILED_PRECONDITION, True),
    (errors.GuestAgentUnavailable, grpc.StatusCode.FAILED_PRECONDITION, False),
    (errors.HypervisorError, grpc.StatusCode.INTERNAL, True),
    (errors.NomadVMError, grpc.StatusCode.INTERNAL, False),
)


def classify(exc: BaseException) -> tuple[grpc.StatusCode, bool]:
    for kind, code, recoverable in STATUS_TABLE:
        if isinstance(exc, kind):
            return code, recoverable
    return grpc.StatusCode.INTERNAL, False


def to_status(exc: BaseException, *, with_recoverable: bool) -> grpc.Status:
    """A status for ``exc``; ``with_recoverable`` adds Nomad's RecoverableError detail."""
    # Imported on the first error: grpc_status and google.rpc are ~6% of the handshake, and
    # most plugin launches never fail an RPC.
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, status_pb2
    from grpc_status import rpc_status

    from nomad_vm.plugin.proto import recoverable_error_pb2

    code, recoverable = classify(exc)
    message = str(exc) or type(exc).__name__
    detail = any_pb2.Any()
    details = []
    if with_recoverable:
        detail.Pack(recoverable_error_pb2.RecoverableError(recoverable=recoverable))
        details.append(detail)
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    return rpc_status.to_status(proto)
