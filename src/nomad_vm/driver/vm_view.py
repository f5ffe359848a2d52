"""The operator view of the plugin's VMs (`nomad-vm vm list | info`): plain JSON-able dicts.

What the driver knows (task, allocation, pid, start time, network record) joined with what the
VMM says it runs (``RunningVM.describe``) and what the host counts (the TAP's counters). A part
that cannot be asked right now (a VMM that does not answer, a paused VM's guest statistics) is
left out with the reason, never guessed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from nomad_vm.driver.task import VMTask
from nomad_vm.errors import NetworkError, NomadVMError
from nomad_vm.network.counters import link_counters


class NoSuchVM(NomadVMError):
    """No task, or several, match what the operator named."""


def find_task(tasks: Mapping[str, VMTask], ref: str) -> VMTask:
    """A task by its id, its allocation's id, or a unique prefix of either (as `nomad` takes
    allocation ids); an error that says which tasks a prefix matches."""
    if ref in tasks:
        return tasks[ref]
    matches = [
        entry
        for task_id, entry in tasks.items()
        if task_id.startswith(ref) or entry.config.alloc_id.startswith(ref)
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NoSuchVM(f"{ref}: no VM task of this plugin has that task or allocation id")
    names = ", ".join(sorted(entry.config.id for entry in matches))
    raise NoSuchVM(f"{ref}: matches several tasks ({names}); give more of the id")


async def state_of(entry: VMTask) -> str:
    if not entry.running or entry.vm is None:
        return "exited"
    if not entry.capabilities.pause:
        return "running"
    try:
        return "paused" if await entry.vm.is_paused() else "running"
    except NomadVMError:
        return "unknown"


async def summary(entry: VMTask) -> dict[str, Any]:
    vmm = entry.journal.vmm
    running = entry.running
    return {
        "task_id": entry.config.id,
        "alloc_id": entry.config.alloc_id,
        "task": entry.config.name,
        "backend": entry.journal.backend,
        "state": await state_of(entry),
        "pid": vmm.pid if vmm is not None and running else None,
        "uptime_seconds": round(time.time() - entry.journal.started_at) if running else None,
    }


async def details(entry: VMTask) -> dict[str, Any]:
    view = await summary(entry)
    view["memory_configured_mb"] = entry.config.resources.memory_mb
    view["control_socket"] = entry.journal.control_socket
    view["runtime_dir"] = entry.journal.runtime_dir
    problems: list[str] = []
    vm = entry.vm
    if vm is not None and entry.running:
        try:
            description = await vm.describe()
            view.update(asdict(description))
        except NomadVMError as exc:
            problems.append(f"the VMM could not be asked what it runs: {exc}")
        try:
            view["memory_used_bytes"] = await vm.guest_memory_used()
        except NomadVMError as exc:
            problems.append(f"guest memory statistics: {exc}")
        # The VMM's own per-device counters (Cloud Hypervisor's vm.counters; Nomad's TaskStats
        # has no field for them, InspectTask shows them as io.<device>.<counter>).
        view["device_io"] = {dev: dict(c) for dev, c in (await vm.device_io()).items()}
        console = vm.console_socket()
        view["console_socket"] = str(console) if console is not None else None
    view["nics"] = await _nics(entry, problems)
    view["problems"] = problems
    return view


async def _nics(entry: VMTask, problems: list[str]) -> list[dict[str, Any]]:
    record = entry.journal.network
    if record is None:
        return []
    nic: dict[str, Any] = {
        "host_link": record.tap,
        "kind": record.kind,
        "bridge": record.bridge or None,
        "lower": record.lower or None,
        "mac": record.guest_mac,
        "address": record.address or None,
        "netns": record.netns or None,
    }
    try:
        counters = await asyncio.to_thread(link_counters, record.tap, netns=record.netns or None)
    except NetworkError as exc:
        problems.append(str(exc))
        counters = None
    if counters is not None:
        # The host link's counters turned to the guest's side: what the TAP receives is what
        # the guest sent.
        nic["guest_tx_bytes"] = counters["rx_bytes"]
        nic["guest_rx_bytes"] = counters["tx_bytes"]
        nic["guest_tx_packets"] = counters["rx_packets"]
        nic["guest_rx_packets"] = counters["tx_packets"]
    return [nic]
