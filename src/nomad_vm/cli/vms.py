"""`nomad-vm vm list | info | pause | resume | snapshot`: the plugin's VMs on this client,
through its control socket (``nomad_vm.control``). Root only, as the socket is."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nomad_vm.control.client import TIMEOUT, ControlError, call
from nomad_vm.control.protocol import socket_path
from nomad_vm.identity import ALIASES

MIB = 1024 * 1024
SNAPSHOT_TIMEOUT = 330.0


def add_vm_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = sub.add_parser("vm", help="the VMs the plugin runs on this client (root)")
    vm_sub = vm.add_subparsers(dest="vm_command", required=True)
    helps = {
        "list": "every VM task of the plugin: state, pid, uptime",
        "info": "one VM: state, accelerator, vCPUs, memory, disks, NICs, sockets",
        "pause": "stop a VM's vCPUs (as `nomad alloc signal -s SIGSTOP`)",
        "resume": "run a paused VM's vCPUs again (as SIGCONT)",
        "snapshot": "save a VM's memory, devices and disks now (it keeps running); the task's "
        "next start resumes from it",
    }
    for name, text in helps.items():
        cmd = vm_sub.add_parser(name, help=text)
        if name != "list":
            cmd.add_argument("task", help="task id, allocation id, or a unique prefix of either")
        cmd.add_argument("--json", action="store_true", help="the plugin's answer as JSON")
        cmd.add_argument(
            "--data-dir", type=Path, help="the plugin's data_dir (default: that of --as)"
        )
        cmd.add_argument(
            "--as",
            dest="as_name",
            choices=sorted(ALIASES),
            default="vm",
            help="the installed name (vm, virt, ch: each has its own data_dir and socket; "
            "default: %(default)s)",
        )
        cmd.set_defaults(func=run_vm_command)


def run_vm_command(args: argparse.Namespace) -> int:
    identity = ALIASES[args.as_name]
    data_dir = args.data_dir or identity.data_dir
    path = socket_path(data_dir.absolute(), identity.alias)
    try:
        # Saving a VM writes its whole memory (the plugin gives it up to 300 s).
        timeout = SNAPSHOT_TIMEOUT if args.vm_command == "snapshot" else TIMEOUT
        result = call(path, args.vm_command, getattr(args, "task", ""), timeout)
    except ControlError as exc:
        print(f"nomad-vm vm {args.vm_command}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.vm_command == "list":
        print(format_list(result if isinstance(result, list) else []))
    elif args.vm_command == "snapshot" and isinstance(result, dict):
        print(format_snapshot(result))
    else:
        print(format_info(result if isinstance(result, dict) else {}))
    return 0


def format_list(vms: list[dict[str, Any]]) -> str:
    if not vms:
        return "no VM tasks"
    header = ("ALLOC", "TASK", "STATE", "PID", "UPTIME", "BACKEND")
    rows = [
        (
            str(vm.get("alloc_id", ""))[:8],
            str(vm.get("task", "")),
            str(vm.get("state", "")),
            str(vm.get("pid") or "-"),
            _duration(vm.get("uptime_seconds")),
            str(vm.get("backend", "")),
        )
        for vm in vms
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])  # fmt: skip


def format_snapshot(saved: dict[str, Any]) -> str:
    memory = saved.get("memory_bytes")
    size = f"{memory // MIB} MiB of memory" if isinstance(memory, int) else "memory"
    return (
        f"Saved {size}, the devices and a copy of the disks in {saved.get('path')}\n"
        "The VM keeps running; the task's next start (in this allocation) resumes this state.\n"
        + format_info(saved.get("vm") or {})
    )


def format_info(vm: dict[str, Any]) -> str:
    lines = [
        f"Task:         {vm.get('task_id')}",
        f"Allocation:   {vm.get('alloc_id')}",
        f"State:        {vm.get('state')}",
        f"Backend:      {vm.get('backend')}",
        f"PID:          {vm.get('pid') or '-'}",
        f"Uptime:       {_duration(vm.get('uptime_seconds'))}",
        f"Accelerator:  {vm.get('accelerator', 'unknown')}",
        f"vCPUs:        {vm.get('vcpus', 'unknown')}",
        f"Memory:       {_memory(vm)}",
        f"Console:      {vm.get('console_socket') or '-'}",
        f"VNC:          {vm.get('vnc_socket') or '-'}",
        f"Control:      {vm.get('control_socket') or '-'}",
    ]
    disks = vm.get("disks") or []
    lines.append(f"Disks:        {'-' if not disks else ''}")
    for disk in disks:
        ro = ", read-only" if disk.get("read_only") else ""
        fmt = f" ({disk.get('format')}{ro})" if disk.get("format") or ro else ""
        lines.append(f"  {disk.get('name') or '?'}: {disk.get('file')}{fmt}")
    nics = vm.get("nics") or []
    lines.append(f"NICs:         {'-' if not nics else ''}")
    for nic in nics:
        where = nic.get("bridge") or nic.get("lower") or ""
        lines.append(
            f"  {nic.get('host_link')} ({nic.get('kind')}{' on ' + where if where else ''}): "
            f"mac {nic.get('mac')}, address {nic.get('address') or '-'}"
        )
        if "guest_rx_bytes" in nic:
            lines.append(
                f"    guest rx {nic['guest_rx_bytes']} bytes / {nic['guest_rx_packets']} packets,"
                f" tx {nic['guest_tx_bytes']} bytes / {nic['guest_tx_packets']} packets"
            )
    device_io = vm.get("device_io") or {}
    if device_io:
        lines.append("Device I/O:   (the VMM's counters)")
        for device, counters in sorted(device_io.items()):
            shown = ", ".join(f"{name} {value}" for name, value in sorted(counters.items()))
            lines.append(f"  {device}: {shown}")
    for problem in vm.get("problems") or []:
        lines.append(f"Note:         {problem}")
    return "\n".join(lines)


def _memory(vm: dict[str, Any]) -> str:
    configured = vm.get("memory_bytes")
    text = f"{configured // MIB} MiB" if configured else f"{vm.get('memory_configured_mb')} MiB"
    if vm.get("plugged_memory_bytes"):
        text += f" + {vm['plugged_memory_bytes'] // MIB} MiB plugged"
    used = vm.get("memory_used_bytes")
    text += f", guest uses {used // MIB} MiB" if used is not None else ", guest use unknown"
    return text


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int):
        return "-"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
