"""Kernel Same-page Merging on this node: the plugin's `ksm {}` policy, starting ksmd with the
operator's pace, and what the node saves (the `driver.vm.ksm.*` attributes).

KSM merges only private anonymous memory: the kernel ignores MADV_MERGEABLE on a shared
mapping (VM_SHARED), and guest RAM shared with virtiofsd is a ``share=on`` memfd, so a
virtio-fs guest's RAM is never merged however QEMU marks it (measured: its RAM mapping lacks
the ``mg`` flag in /proc/<pid>/smaps, and its ksm_merging_pages stays 0; bench/ksm.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.driver.types import AttributeValue
from nomad_vm.vm.request import VMPlan

log = logging.getLogger(__name__)

KSM_SYSFS = Path("/sys/kernel/mm/ksm")
PREFIX = "driver.vm.ksm."
# Why a virtio-fs guest is not merged, for the fingerprint and the task event.
SHARED_RAM_NOT_MERGED = (
    "guest RAM shared with virtiofsd (virtio-fs shares) is not merged: the kernel merges only "
    'private memory; use share_transport = "9p" or share_task_dirs = false to merge it'
)


@dataclass(frozen=True)
class KsmPolicy:
    enabled: bool = False
    start_ksmd: bool = True
    # None: the host's own value is left alone.
    pages_to_scan: int | None = None
    sleep_millisecs: int | None = None


def parse_ksm(block: Mapping[str, object] | None) -> KsmPolicy:
    """The validated block (schema defaults filled in; None or empty: the block is absent)."""
    if not block:
        return KsmPolicy()

    def number(name: str) -> int | None:
        value = block.get(name)
        return int(value) if isinstance(value, int) else None

    return KsmPolicy(
        enabled=bool(block.get("enabled")),
        start_ksmd=block.get("start_ksmd") is not False,
        pages_to_scan=number("pages_to_scan"),
        sleep_millisecs=number("sleep_millisecs"),
    )


@dataclass(frozen=True)
class KsmOutcome:
    """What applying the policy did: ``problem`` is why KSM cannot work here (None: it can)."""

    problem: str | None = None


def apply_ksm(policy: KsmPolicy, root: Path = KSM_SYSFS) -> KsmOutcome:
    """Set ksmd's pace and start it, as the policy says. Never stops ksmd (another program
    may rely on it) and never fails the plugin's configuration: a host without KSM, or a
    plugin without the right to tune it, is reported (fingerprint) and VMs still run."""
    if not policy.enabled:
        return KsmOutcome()
    if not (root / "run").exists():
        return KsmOutcome(f"this kernel has no KSM ({root} is missing: CONFIG_KSM is off)")
    # The pace first, so ksmd never runs with the old one after the plugin asked otherwise.
    writes = [
        ("pages_to_scan", policy.pages_to_scan),
        ("sleep_millisecs", policy.sleep_millisecs),
        ("run", 1 if policy.start_ksmd else None),
    ]
    for name, value in writes:
        if value is None:
            continue
        try:
            (root / name).write_text(f"{value}\n")
        except OSError as exc:
            problem = f"cannot set {root / name} to {value}: {exc.strerror or exc}"
            log.warning("ksm: %s", problem)
            return KsmOutcome(problem)
    return KsmOutcome()


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def profit_bytes(root: Path = KSM_SYSFS) -> tuple[int, str]:
    """Bytes KSM saves on this host, and where the figure came from: the kernel's own
    ``general_profit`` (6.4+: net of KSM's own bookkeeping), else pages_sharing pages."""
    general = _read_int(root / "general_profit")
    if general is not None:
        return general, "general_profit"
    sharing = _read_int(root / "pages_sharing") or 0
    return sharing * os.sysconf("SC_PAGE_SIZE"), "pages_sharing"


def ksm_attributes(
    policy: KsmPolicy, outcome: KsmOutcome, virtiofs: bool, root: Path = KSM_SYSFS
) -> dict[str, AttributeValue]:
    """``driver.vm.ksm.*``: whether the plugin uses KSM, ksmd's state and pace, and the
    savings. ``virtiofs``: the node's shares use virtio-fs, whose guests' RAM is not merged."""
    attrs: dict[str, AttributeValue] = {PREFIX + "enabled": policy.enabled}
    if not (root / "run").exists():
        attrs[PREFIX + "state"] = "unavailable"
        attrs[PREFIX + "reason"] = f"this kernel has no KSM ({root} is missing)"
        return attrs
    run = _read_int(root / "run")
    attrs[PREFIX + "state"] = {0: "stopped", 1: "running", 2: "unmerging"}.get(run or 0, "?")
    if outcome.problem is not None:
        attrs[PREFIX + "reason"] = outcome.problem
    for name in ("pages_to_scan", "sleep_millisecs", "pages_sharing", "pages_shared"):
        value = _read_int(root / name)
        if value is not None:
            attrs[PREFIX + name] = value
    profit, source = profit_bytes(root)
    attrs[PREFIX + "profit_bytes"] = profit
    attrs[PREFIX + "profit_mib"] = profit // 2**20
    attrs[PREFIX + "profit_source"] = source
    if policy.enabled and virtiofs:
        attrs[PREFIX + "virtiofs_guests"] = SHARED_RAM_NOT_MERGED
    return attrs


def ksm_start_event(policy: KsmPolicy, outcome: KsmOutcome, plan: VMPlan) -> str | None:
    """The task event saying what KSM does for this VM (None: the plugin does not use KSM)."""
    if not policy.enabled:
        return None
    if outcome.problem is not None:
        return f"KSM: not merging this VM's RAM: {outcome.problem}"
    if plan.backend != "qemu":
        return f"KSM: not applied to {plan.backend} VMs (QEMU only)"
    if plan.request.hugepages:
        return "KSM: not merging this VM's RAM: it is on huge pages, which the kernel never merges"
    if plan.shares and plan.share_transport.name == "virtiofs":
        return f"KSM: not merging this VM's RAM: {SHARED_RAM_NOT_MERGED}"
    return "KSM: guest RAM is mergeable"
