"""Which hypervisor backends this plugin has, by name.

The driver gets a backend from here (for a new task: the default; for a recovered one: the name
its journal recorded) and never imports a backend module itself. Backends are imported on first
use, so a plugin that only answers Nomad's handshake loads none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from nomad_vm.errors import HypervisorError
from nomad_vm.vm.hypervisor import Hypervisor

BackendFactory = Callable[[], Hypervisor]


def _qemu() -> Hypervisor:
    from nomad_vm.vm.qemu.backend import QemuHypervisor

    return QemuHypervisor()


def _cloud_hypervisor() -> Hypervisor:
    from nomad_vm.vm.cloud_hypervisor.backend import CloudHypervisor

    return CloudHypervisor()


BUILT_IN: Mapping[str, BackendFactory] = {"qemu": _qemu, "cloud-hypervisor": _cloud_hypervisor}
DEFAULT_BACKEND = "qemu"


class HypervisorRegistry:
    """Backend name -> backend (made once, on first use)."""

    def __init__(
        self, factories: Mapping[str, BackendFactory] = BUILT_IN, default: str = DEFAULT_BACKEND
    ) -> None:
        if default not in factories:
            raise ValueError(f"default backend {default!r} is not among {sorted(factories)}")
        self._factories = dict(factories)
        self._made: dict[str, Hypervisor] = {}
        self.default_name = default

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._factories))

    def get(self, name: str) -> Hypervisor:
        """The backend called ``name``; HypervisorError when this plugin has none of that name
        (a task recorded by a plugin version with another backend)."""
        if name not in self._made:
            factory = self._factories.get(name)
            if factory is None:
                known = ", ".join(self.names)
                raise HypervisorError(f"this plugin has no hypervisor backend {name!r} ({known})")
            self._made[name] = factory()
        return self._made[name]

    def default(self) -> Hypervisor:
        return self.get(self.default_name)

    def preferred(self, name: str | None) -> Hypervisor:
        """The backend ``name`` (a plugin's `hypervisor`) when this registry has it, else the
        default."""
        return self.get(name) if name is not None and name in self.names else self.default()
