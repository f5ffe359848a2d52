"""The driver the plugin serves: built on first use, closed by a shutdown, rebuilt after one.

Nomad launches the plugin two or three times per agent start, twice only for PluginInfo,
ConfigSchema and SetConfig. Importing the driver (QMP, psutil, msgpack and the VM layer) takes
tens of milliseconds that the handshake would otherwise wait for; this defers them until an RPC
actually needs the driver.

Nomad 2.0.4+ also tells the plugin when it is about to be killed (Driver.Shutdown, on a graceful
agent shutdown) and when an agent starts using it (Driver.Init: after SetConfig, and again when
an agent reattaches to this process). A shutdown closes the driver's connections to its VMs,
which keep running; the next use builds a fresh driver with the last config, so an agent that
reattaches after a Shutdown (it died before its Kill) recovers the VMs anew instead of meeting
closed connections. docs/plugin-protocol.md has the Nomad source lines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nomad_vm.driver.port import DriverPort
    from nomad_vm.driver.types import AgentInfo

log = logging.getLogger(__name__)


class LazyDriver:
    def __init__(self, factory: Callable[[], DriverPort]) -> None:
        self._factory = factory
        self._driver: DriverPort | None = None
        # The last accepted SetConfig, for a driver built after a shutdown: an agent that
        # reattaches sends no SetConfig.
        self._config: tuple[Mapping[str, object] | None, AgentInfo | None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def _get(self) -> DriverPort:
        if self._driver is None:
            driver = self._factory()
            if self._config is not None:
                driver.set_config(*self._config)  # accepted before; validation is pure
            self._driver = driver
        return self._driver

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def set_config(self, raw: Mapping[str, object] | None, agent: AgentInfo | None) -> None:
        self._get().set_config(raw, agent)  # raises on a bad config: nothing is remembered
        # The driver keeps its agent info when a SetConfig has none (the validation launch).
        kept_agent = self._config[1] if self._config is not None else None
        self._config = (raw, agent if agent is not None else kept_agent)

    async def init(self) -> None:
        """Make sure a live driver serves: after a shutdown, once its connections are closed
        (a VM's monitor takes one client at a time). Idempotent."""
        await self._wait_closed()
        self._get()

    async def shutdown(self) -> None:
        """Close the current driver (its VMs keep running); never build one just for this.

        The close runs as its own task and finishes even when the caller stops waiting
        (Driver.Shutdown answers within Nomad's 2 s); a later call waits for it."""
        driver, self._driver = self._driver, None
        if driver is not None:
            task = asyncio.create_task(_close(driver))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        await self._wait_closed()

    async def _wait_closed(self) -> None:
        if self._closing:
            await asyncio.shield(asyncio.gather(*self._closing))


async def _close(driver: DriverPort) -> None:
    try:
        await driver.shutdown()
    except Exception:  # best effort: the plugin is going away or starting afresh either way
        log.exception("closing the driver failed")
