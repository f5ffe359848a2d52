"""StartTask's steps by name, and a hook at each one for tests of crashes and failures.

Each checkpoint comes after the step's host change is in the journal and before it is made
(``helpers-spawned``, ``vmm-spawned``: after the fork, before the record; ``helpers-recorded``,
``vmm-recorded``: after the record, before the processes may run). A plugin killed at a
checkpoint leaves exactly what a real crash there would leave. In production the hook does
nothing. Tests inject a failure at a checkpoint (``FailAt`` in the conformance suite), or pause
the real plugin process there to SIGKILL it: ``NOMAD_VM_TEST_PAUSE_AT=<step>`` with
``NOMAD_VM_TEST_PAUSE_MARKER=<file>``, which the plugin creates when it has paused. Nothing else
reads those variables.
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
    "firmware-vars",
    "helpers-spawned",
    "helpers-recorded",
    "vmm-spawned",
    "vmm-recorded",
    "started",
)
PAUSE_AT = "NOMAD_VM_TEST_PAUSE_AT"
PAUSE_MARKER = "NOMAD_VM_TEST_PAUSE_MARKER"


class Checkpoints(Protocol):
    async def reached(self, step: str, task_id: str) -> None: ...


class NoCheckpoints:
    """Production: steps just run."""

    async def reached(self, step: str, task_id: str) -> None:
        return None


class PauseAt:
    """Stop the StartTask at ``step`` forever (the test then kills the plugin), after creating
    ``marker`` to say so."""

    def __init__(self, step: str, marker: Path) -> None:
        self.step = step
        self.marker = marker

    async def reached(self, step: str, task_id: str) -> None:
        if step != self.step:
            return
        log.warning("test hook: StartTask of %s paused at %s", task_id, step)
        self.marker.write_text(f"{task_id}\n{step}\n")
        await asyncio.Event().wait()


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
    return PauseAt(step, Path(marker))
