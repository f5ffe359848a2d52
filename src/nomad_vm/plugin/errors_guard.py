"""Turning exceptions into gRPC statuses at the servicer edge (the table is in status.py)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from nomad_vm.errors import NomadVMError
from nomad_vm.plugin.status import to_status

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def rpc_errors(
    context: grpc.aio.ServicerContext, rpc: str, *, recoverable_detail: bool = False
) -> AsyncIterator[None]:
    """Abort the RPC with our status for any error; unexpected ones are logged with a traceback.

    An exception escaping a handler would reach Nomad as "Exception calling application", so
    everything is mapped explicitly.
    """
    try:
        yield
    except NomadVMError as exc:
        log.info("%s failed: %s", rpc, exc)
        await context.abort_with_status(to_status(exc, with_recoverable=recoverable_detail))
    except Exception as exc:
        if isinstance(exc, grpc.aio.AbortError):
            raise
        log.exception("%s failed unexpectedly", rpc)
        await context.abort_with_status(to_status(exc, with_recoverable=recoverable_detail))
