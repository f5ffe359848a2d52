"""The plugin's `ksm {}` block: Kernel Same-page Merging of guest RAM (driver/ksm.py)."""

from __future__ import annotations

from nomad_vm.fields import Field

KSM_BLOCK = Field(
    "ksm",
    "block",
    "Kernel Same-page Merging: identical pages of different guests (the same kernel, the "
    "same libraries, zeroed memory) are kept once on the host. With `enabled`, QEMU marks "
    "each guest's RAM mergeable (`-machine mem-merge=on`) and the plugin starts the host's "
    "ksmd. What it saves is reported as `driver.vm.ksm.*` node attributes. Guest RAM shared "
    "with virtiofsd (virtio-fs shares) cannot be merged: the kernel merges only private "
    "memory (see docs/memory.md).",
    fields=(
        Field(
            "enabled",
            "bool",
            "Mark guest RAM mergeable and run ksmd. Off: the plugin changes nothing on the "
            "host (QEMU's own default still marks private guest RAM mergeable, so a ksmd "
            "the host runs anyway merges it).",
            default=False,
        ),
        Field(
            "start_ksmd",
            "bool",
            "Start the host's ksmd (`/sys/kernel/mm/ksm/run` = 1) when the plugin is "
            "configured. Off: leave ksmd to the host (e.g. ksmtuned); guest RAM is still "
            "marked mergeable. The plugin never stops ksmd: other programs may use it.",
            default=True,
        ),
        Field(
            "pages_to_scan",
            "number",
            "Pages ksmd scans per wake-up (`/sys/kernel/mm/ksm/pages_to_scan`). Unset: the "
            "host's value. More pages merge sooner and cost more host CPU.",
            example="1000",
            minimum=1,
        ),
        Field(
            "sleep_millisecs",
            "number",
            "Milliseconds ksmd sleeps between scans (`/sys/kernel/mm/ksm/sleep_millisecs`). "
            "Unset: the host's value.",
            example="20",
            minimum=1,
        ),
    ),
)
