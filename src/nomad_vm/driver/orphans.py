"""Tasks an earlier plugin process left that Nomad will never ask about again.

A new plugin process finds journals it neither runs nor is starting. Nomad claims the ones
it still knows: RecoverTask for the tasks it has handles of (right after it launched the
plugin), DestroyTask for the ones it wants gone, StartTask of a next start of the task
(``recovery.superseded_starts``). What is left after that is nobody's:

* a task whose VM ended while no plugin watched and which Nomad restored as dead (an agent
  stopped between the end and DestroyTask): undone at once (``ended_orphans``);
* a task whose StartTask the old plugin never answered because it died after starting the VM,
  when Nomad then gave up on the task ("failed to initialize driver after it exited
  unexpectedly ... Error was unrecoverable"): Nomad has no handle, so it never calls
  RecoverTask or DestroyTask, and if the allocation is not restarted the VM would run on,
  unknown to everyone (the cluster bed's chaos run found one). A journal nobody claimed by
  ``UNCLAIMED_GRACE`` after the plugin's first fingerprint, with no RecoverTask for
  ``RECOVERY_QUIET`` (Nomad's recovery round is over), is undone: its VM is stopped and
  everything it made removed. Nomad recovers in seconds; a RecoverTask that still came later
  finds the VM gone and reports the task as ended (Nomad restarts it by its policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable

from nomad_vm.driver.journal import TaskJournal
from nomad_vm.processes import is_same_process

log = logging.getLogger(__name__)

UNCLAIMED_GRACE = 90.0
RECOVERY_QUIET = 30.0
CHECK_EVERY = 5.0

Undo = Callable[[list[TaskJournal], str], Awaitable[None]]


def ended_orphans(journals: list[TaskJournal], busy: Collection[str]) -> list[TaskJournal]:
    """Journals of tasks this plugin neither runs nor is starting (``busy``: their ids) whose
    VMM an earlier plugin started and which has ended.

    Undoing such a journal is safe whatever Nomad does next: a RecoverTask gets the journal
    from Nomad's handle and finds the VM gone, a DestroyTask finds nothing left. A journal
    without a VMM (a start a plugin died in) is left to DestroyTask, to the task's next start
    (``superseded_starts``) or to the unclaimed sweep: it may be a start Nomad still retries.
    """
    return [
        j
        for j in journals
        if j.task_id not in busy and j.vmm is not None and not is_same_process(j.vmm)
    ]


class UnclaimedJournals:
    """Which of the journals found at start-up Nomad has not claimed, and when they are due."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._watched: set[str] = set()
        self._since = 0.0
        self._last_claim = 0.0

    @property
    def pending(self) -> bool:
        return bool(self._watched)

    def watch(self, task_ids: Iterable[str]) -> None:
        self._watched = set(task_ids)
        self._since = self._last_claim = self._clock()

    def claim(self, task_id: str) -> None:
        """RecoverTask of ``task_id``: claimed, and Nomad's recovery round still going."""
        self._watched.discard(task_id)
        self._last_claim = self._clock()

    def due(self, busy: Collection[str]) -> set[str]:
        """The unclaimed ids once the grace and the quiet are over (then no longer watched)."""
        now = self._clock()
        if now - self._since < UNCLAIMED_GRACE or now - self._last_claim < RECOVERY_QUIET:
            return set()
        found, self._watched = self._watched - set(busy), set()
        return found


class OrphanSweeper:
    """The plugin's two sweeps: ended orphans at the first fingerprint, unclaimed ones later."""

    def __init__(
        self,
        journals: Callable[[], list[TaskJournal]],
        busy: Callable[[], Collection[str]],
        undo: Undo,
    ) -> None:
        self._journals = journals
        self._busy = busy
        self._undo = undo
        self.unclaimed = UnclaimedJournals()
        self._started = False
        self._later: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Once per plugin process: undo ended orphans, watch the rest for a claim."""
        if self._started:
            return
        self._started = True
        busy = self._busy()
        await self._undo(ended_orphans(self._journals(), busy), "VM ended")
        self.unclaimed.watch(j.task_id for j in self._journals() if j.task_id not in busy)
        if self.unclaimed.pending:
            self._later = asyncio.ensure_future(self._sweep_unclaimed())

    def claim(self, task_id: str) -> None:
        self.unclaimed.claim(task_id)

    async def _sweep_unclaimed(self) -> None:
        while self.unclaimed.pending:
            await asyncio.sleep(CHECK_EVERY)
            due = self.unclaimed.due(self._busy())
            stale = [j for j in self._journals() if j.task_id in due]
            if stale:
                log.warning(
                    "stopping what an earlier plugin process left for tasks Nomad never "
                    "claimed: %s",
                    ", ".join(j.task_id for j in stale),
                )
                await self._undo(stale, "left by an earlier plugin and not claimed by Nomad")

    async def close(self) -> None:
        if self._later is not None:
            self._later.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._later
