"""What every backend's launch does the same way: report gated processes to the recorder and
only then release them, and tell whether a just-started VMM is still there."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import psutil

from nomad_vm.vm.hypervisor import LaunchRecorder, SpawnedProcess
from nomad_vm.vm.process import SupervisedProcess


async def record_and_release(
    recorder: LaunchRecorder,
    processes: Sequence[SupervisedProcess],
    role: str,
    started: Sequence[SupervisedProcess] = (),
    control_socket: Path | None = None,
) -> None:
    """Tell the recorder, then let the processes run. If it fails (or the start is cancelled),
    they end at their gates without having run, and ``started`` (already running) with them."""
    if not processes:
        return
    try:
        await recorder.spawned([SpawnedProcess(role, p.ident) for p in processes], control_socket)
    except BaseException:
        for process in [*processes, *started]:
            process.kill_and_reap()
        raise
    for process in processes:
        process.release()


def is_running(process: SupervisedProcess) -> bool:
    """Not ended (nor a zombie waiting to be reaped)."""
    if process.exit is not None:
        return False
    with contextlib.suppress(psutil.Error):
        return psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE
    return False
