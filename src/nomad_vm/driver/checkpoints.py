"""StartTask's steps by name, and a hook at each one for tests of crashes and failures.

Each checkpoint comes after the step's host change is in the journal and before it is made
(``helpers-spawned``, ``vmm-spawned``: after the fork, before the record; ``helpers-recorded``,
``vmm-recorded``: after the record, before the processes may run). A plugin killed at a
checkpoint leaves exactly what a real crash there would leave. In production the hook does
nothing. Tests inject a failure at a checkpoint (``FailAt`` in the conformance suite), or pause
the real plugin process there to SIGKILL it: ``NOMAD_VM_TEST_PAUSE_AT=<step>`` with
``NOMAD_VM_TEST_PAUSE_MARKER=<file>``, which the plugin creates when it has paused. With
``NOMAD_VM_TEST_RESUME_FIFO=<fifo>`` too, the start goes on once the test has written to that
FIFO and closed it (the test changes the host in between: e.g. swaps a validated file for a
symlink, test_file_swap.py). Nothing else reads those variables.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

START_STEPS = (
    "runtime-dir",
    "disk",
    "network",
    "seed",
    "cgroup",
    "firmware-vars",
    "helpers-spawned",
    "helpers-recorded",
    "vmm-spawned",
    "vmm-recorded",
    "started",
)
PAUSE_AT = "NOMAD_VM_TEST_PAUSE_AT"
PAUSE_MARKER = "NOMAD_VM_TEST_PAUSE_MARKER"
RESUME_FIFO = "NOMAD_VM_TEST_RESUME_FIFO"


class Checkpoints(Protocol):
    async def reached(self, step: str, task_id: str) -> None: ...


class NoCheckpoints:
    """Production: steps just run."""

    async def reached(self, step: str, task_id: str) -> None:
        return None


class PauseAt:
    """Stop the StartTask at ``step``, after creating ``marker`` to say so: forever (the test
    then kills the plugin), or until the test writes to the ``resume`` FIFO and closes it."""

    def __init__(self, step: str, marker: Path, resume: Path | None = None) -> None:
        self.step = step
        self.marker = marker
        self.resume = resume

    async def reached(self, step: str, task_id: str) -> None:
        if step != self.step:
            return
        log.warning("test hook: StartTask of %s paused at %s", task_id, step)
        self.marker.write_text(f"{task_id}\n{step}\n")
        if self.resume is None:
            await asyncio.Event().wait()
            return
        # Opening a FIFO blocks until the test opens it to write; reading ends when it closes.
        await asyncio.to_thread(self.resume.read_bytes)
        log.warning("test hook: StartTask of %s resumed at %s", task_id, step)


def checkpoints_from_environment(environ: Mapping[str, str] = os.environ) -> Checkpoints:
    step = environ.get(PAUSE_AT, "")
    marker = environ.get(PAUSE_MARKER, "")
    if not step:
        return NoCheckpoints()
    if step not in START_STEPS or not marker:
        log.error(
            "ignoring %s=%r: it needs one of %s and %s", PAUSE_AT, step, START_STEPS, PAUSE_MARKER
        )
        return NoCheckpoints()
    resume = environ.get(RESUME_FIFO, "")
    return PauseAt(step, Path(marker), Path(resume) if resume else None)
