"""The plugin's `memory_hotplug {}` block: how the driver resizes guests' hot-pluggable memory
(Nomad's `memory_max`; driver/memory_policy.py, docs/memory.md)."""

from __future__ import annotations

from nomad_vm.fields import Field

MEMORY_HOTPLUG_BLOCK = Field(
    "memory_hotplug",
    "block",
    "How the plugin resizes the hot-pluggable memory of tasks with Nomad's `memory_max` "
    "(virtio-mem): it plugs 128 MiB when a guest runs short and unplugs it again once the "
    "guest has had it to spare for a while (docs/memory.md).",
    fields=(
        Field(
            "shrink_after",
            "number",
            "Seconds a guest must have 128 MiB to spare, continuously, before they are "
            "unplugged (and again before each further step). Shorter gives memory back "
            "sooner; longer spares a guest whose use comes in waves the unplug and re-plug.",
            default=10,
            minimum=1,
        ),
    ),
)
