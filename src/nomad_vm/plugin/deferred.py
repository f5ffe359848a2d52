"""A gRPC service that is registered by name and built on its first call.

The Driver service's module brings in the conversions and, through them, the driver's types:
all of `nomad_vm.driver`, which pulls in `vm/`, `storage/` and `network/`. Nomad's first two
launches of the plugin (fingerprint, config validation) never call a Driver method, and the
long-lived one calls them only after SetConfig has built the driver. Building the service on
its first call keeps all of that out of the handshake (tests/unit/test_plugin_imports.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc


class DeferredService(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Answers the methods of ``service_name`` with the handlers ``register`` adds, calling it
    once, on the first call of one of them. ``register`` is a generated
    ``add_<Service>Servicer_to_server``-style function given a stand-in for the server."""

    def __init__(self, service_name: str, register: Callable[[Any], None]) -> None:
        self._prefix = f"/{service_name}/"
        self._register = register
        self._handlers: tuple[grpc.GenericRpcHandler, ...] | None = None

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method
        if not method.startswith(self._prefix):
            return None
        if self._handlers is None:
            collector = _HandlerCollector()
            self._register(collector)
            self._handlers = tuple(collector.handlers)
        for handler in self._handlers:
            found = handler.service(handler_call_details)
            if found is not None:
                return found
        return None


class _HandlerCollector:
    """Takes what a generated registration function gives a server."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        # The same handlers as the generic one above; pre-registration only works before the
        # server starts, and this service is built after.
        pass
