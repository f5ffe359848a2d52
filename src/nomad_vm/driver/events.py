"""Task events fan out to every open TaskEvents stream (Nomad keeps one per plugin instance)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime

from nomad_vm.driver.types import TaskConfig, TaskEvent

# Events emitted while no TaskEvents stream is open (e.g. "Reattached" during RecoverTask, which
# Nomad calls before it opens the stream) wait here for the first subscriber.
BACKLOG_LIMIT = 200


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[TaskEvent]] = set()
        self._backlog: collections.deque[TaskEvent] = collections.deque(maxlen=BACKLOG_LIMIT)

    def emit(
        self, task: TaskConfig, message: str, annotations: Mapping[str, str] | None = None
    ) -> None:
        event = TaskEvent(
            task_id=task.id,
            alloc_id=task.alloc_id,
            task_name=task.name,
            timestamp=datetime.now(UTC),
            message=message,
            annotations=dict(annotations or {}),
        )
        if not self._subscribers:
            self._backlog.append(event)
        for queue in self._subscribers:
            queue.put_nowait(event)

    async def subscribe(self) -> AsyncIterator[TaskEvent]:
        """Yield events until the consumer stops iterating (the stream is cancelled)."""
        queue: asyncio.Queue[TaskEvent] = asyncio.Queue()
        while self._backlog:
            queue.put_nowait(self._backlog.popleft())
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)
