"""A DriverPort that builds the real driver on first use.

Nomad launches the plugin two or three times per agent start, twice only for PluginInfo,
ConfigSchema and SetConfig. Importing the driver (QMP, psutil, msgpack and the VM layer) takes
tens of milliseconds that the handshake would otherwise wait for; this defers them until an RPC
actually needs the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nomad_vm.driver.port import DriverPort


class LazyDriver:
    def __init__(self, factory: Callable[[], DriverPort]) -> None:
        self._factory = factory
        self._driver: DriverPort | None = None

    def _get(self) -> DriverPort:
        if self._driver is None:
            self._driver = self._factory()
        return self._driver

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    async def shutdown(self) -> None:
        # Never build a driver just to shut it down.
        if self._driver is not None:
            await self._driver.shutdown()
