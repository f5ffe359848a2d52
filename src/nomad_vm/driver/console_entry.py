"""A task with a display gets an entry in the console registry (``nomad_vm.console.registry``),
recorded in its journal first, so the replay that undoes the start (DestroyTask, a failed
start) removes it like any other file of the task."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nomad_vm.console.registry import ConsoleEntry, encode, ensure_directory, entry_path
from nomad_vm.driver.recorder import TaskRecorder
from nomad_vm.driver.startup import StartPlan
from nomad_vm.files import write_atomically


async def register_console(plan: StartPlan, recorder: TaskRecorder, data_dir: Path) -> None:
    socket = plan.vm_plan.display_socket
    if socket is None:
        return
    task = plan.task
    entry = ConsoleEntry(
        alloc_id=task.alloc_id,
        task=task.name,
        namespace=task.namespace,
        job=task.job_name,
        display=plan.vm.display,
        socket=str(socket),
    )
    path = entry_path(data_dir, task.id)
    await recorder.creating("console-entry", path)

    def write() -> None:
        ensure_directory(data_dir)
        # Not fsynced: a host crash ends the VM too, and the next start writes a new entry.
        write_atomically(path, encode(entry), durable=False)

    await asyncio.to_thread(write)
