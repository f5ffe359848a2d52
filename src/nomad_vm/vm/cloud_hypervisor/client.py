"""Cloud Hypervisor's REST API (``/api/v1/...``) over the VMM's unix socket, with httpx.

Only the endpoints this backend uses; bodies and replies go through the typed model. Any
failure (no socket, VMM gone, an error status, a reply that does not parse) is a
HypervisorError saying which call and, for error statuses, CH's own message (its body).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.cloud_hypervisor.model import (
    DeviceCounters,
    ModelError,
    RestoreConfig,
    VmConfig,
    VmInfo,
    VmmPingResponse,
    VmSnapshotConfig,
    from_json,
    parse_counters,
    to_json,
)

T = TypeVar("T")
# The host part is ignored on a unix socket; CH's server only looks at the path.
BASE_URL = "http://localhost/api/v1/"
# Every call but vm.snapshot and vm.restore returns at once in CH (vm.boot too: the vCPUs run in
# their own threads); those two take a timeout of their own.
CALL_TIMEOUT = 30.0
# Between tries while the VMM creates its socket.
READY_POLL = 0.02


class ChApiError(HypervisorError):
    """A call CH answered with an error status; ``status`` is the HTTP status."""

    def __init__(self, call: str, status: int, said: str) -> None:
        super().__init__(f"Cloud Hypervisor refused {call} (HTTP {status}): {said or 'no reason'}")
        self.status = status


class ChClient:
    """One VMM's API. ``close`` when done (the VMM keeps running)."""

    def __init__(self, socket: Path, timeout: float = CALL_TIMEOUT) -> None:
        self.socket = socket
        transport = httpx.AsyncHTTPTransport(uds=str(socket))
        self._http = httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def ping(self) -> VmmPingResponse:
        return _parse(VmmPingResponse, await self._call("GET", "vmm.ping"), "vmm.ping")

    async def create(self, config: VmConfig) -> None:
        await self._call("PUT", "vm.create", to_json(config))

    async def boot(self) -> None:
        await self._call("PUT", "vm.boot")

    async def info(self) -> VmInfo:
        return _parse(VmInfo, await self._call("GET", "vm.info"), "vm.info")

    async def counters(self) -> DeviceCounters:
        """Each device's I/O counters (by the ids we gave the devices)."""
        reply = await self._call("GET", "vm.counters")
        try:
            return parse_counters(reply)
        except ModelError as exc:
            raise HypervisorError(f"Cloud Hypervisor's vm.counters reply: {exc}") from exc

    async def pause(self) -> None:
        await self._call("PUT", "vm.pause")

    async def resume(self) -> None:
        await self._call("PUT", "vm.resume")

    async def snapshot(self, destination_url: str, timeout: float) -> None:
        """``vm.snapshot`` of the paused VM into a directory (``file://...``): CH writes its
        config, device state and all of guest memory before answering."""
        body = to_json(VmSnapshotConfig(destination_url))
        await self._call("PUT", "vm.snapshot", body, timeout=timeout)

    async def restore(self, source_url: str, timeout: float) -> None:
        """``vm.restore`` into a VMM that has no VM yet; the VM comes back paused."""
        await self._call("PUT", "vm.restore", to_json(RestoreConfig(source_url)), timeout=timeout)

    async def power_button(self) -> None:
        await self._call("PUT", "vm.power-button")

    async def shutdown_vmm(self) -> None:
        await self._call("PUT", "vmm.shutdown")

    async def _call(
        self, method: str, endpoint: str, body: object = None, timeout: float | None = None
    ) -> Any:
        # Per call when given (a snapshot writes all of guest memory), else the client's.
        limit: Any = httpx.USE_CLIENT_DEFAULT if timeout is None else timeout
        try:
            if body is None:
                reply = await self._http.request(method, endpoint, timeout=limit)
            else:
                reply = await self._http.request(method, endpoint, json=body, timeout=limit)
        except httpx.HTTPError as exc:
            raise HypervisorError(
                f"Cloud Hypervisor API {endpoint} on {self.socket}: {exc or type(exc).__name__}"
            ) from exc
        if reply.is_error:
            raise ChApiError(endpoint, reply.status_code, reply.text.strip()[-1000:])
        if not reply.content:
            return None
        try:
            return reply.json()
        except ValueError as exc:
            raise HypervisorError(f"Cloud Hypervisor's {endpoint} reply is not JSON") from exc


def _parse(cls: type[T], data: object, call: str) -> T:
    try:
        return from_json(cls, data, strict=False)
    except ModelError as exc:
        raise HypervisorError(f"Cloud Hypervisor's {call} reply does not parse: {exc}") from exc


async def connect_when_ready(
    socket: Path, running: Callable[[], Awaitable[bool]], timeout: float
) -> tuple[ChClient, VmmPingResponse]:
    """A client once ``vmm.ping`` answers; HypervisorError when the VMM ends first (``running``
    says) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    client = ChClient(socket)
    last: HypervisorError | None = None
    try:
        while True:
            if socket.exists():
                try:
                    return client, await client.ping()
                except HypervisorError as exc:
                    last = exc
            if not await running():
                raise HypervisorError(f"Cloud Hypervisor ended before its API answered: {last}")
            if time.monotonic() > deadline:
                raise HypervisorError(
                    f"Cloud Hypervisor's API socket {socket} did not answer within "
                    f"{timeout:g} s: {last or 'it was never created'}"
                )
            await asyncio.sleep(READY_POLL)
    except BaseException:
        await client.close()
        raise
