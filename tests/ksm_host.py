"""The host's KSM settings for tests and benchmarks: the plugin's `ksm` block as Nomad sends
it, and a context that puts ksmd back as it found it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from nomad_vm.driver.ksm import KSM_SYSFS

TUNABLES = ("pages_to_scan", "sleep_millisecs", "run")


def ksm_block(**overrides: object) -> dict[str, object]:
    """The plugin's ``ksm`` block as Nomad sends it: all 4 attributes, unset ones null."""
    block: dict[str, object] = {
        "enabled": True,
        "start_ksmd": None,
        "pages_to_scan": None,
        "sleep_millisecs": None,
        **overrides,
    }
    assert len(block) == 4, block
    return block


def read(name: str) -> int:
    return int((KSM_SYSFS / name).read_text().split()[0])


def write(name: str, value: int) -> None:
    (KSM_SYSFS / name).write_text(f"{value}\n")


@contextlib.contextmanager
def ksm_restored() -> Iterator[None]:
    """Restore ksmd's pace and run state on exit. When ksmd was stopped before, the pages it
    merged meanwhile are unmerged first (run = 2), so the host is as it was."""
    saved = {name: read(name) for name in TUNABLES}
    try:
        yield
    finally:
        if saved["run"] == 0 and read("run") != 0:
            write("run", 2)
        for name in TUNABLES:
            write(name, saved[name])
