"""Which consoles a caller may open: the registry's entries on this node that Nomad lets the
caller's token `alloc exec` into (``NomadAgent.may_exec``). With ACLs off Nomad lets anyone
exec, and so every entry is open (the server then binds loopback only unless told otherwise)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from nomad_vm.console.nomad import NomadAgent
from nomad_vm.console.registry import ConsoleEntry, read_entries


class Consoles:
    def __init__(self, agent: NomadAgent, data_dirs: Sequence[Path]) -> None:
        self.agent = agent
        self.data_dirs = tuple(data_dirs)

    def entries(self) -> list[ConsoleEntry]:
        return [e for d in self.data_dirs for e in read_entries(d)]

    async def allowed(self, token: str | None) -> list[ConsoleEntry]:
        entries = self.entries()
        verdicts = await asyncio.gather(
            *(self.agent.may_exec(token, e.alloc_id, e.task) for e in entries)
        )
        return [e for e, ok in zip(entries, verdicts, strict=True) if ok]

    async def find(self, token: str | None, alloc_id: str, task: str) -> ConsoleEntry | None:
        """The entry for ``alloc_id``/``task`` if the caller may open it, else None (the same
        answer for "no such VM" and "not yours": a caller learns nothing of others' VMs)."""
        matching = [e for e in self.entries() if e.alloc_id == alloc_id and e.task == task]
        if not matching or not await self.agent.may_exec(token, alloc_id, task):
            return None
        # A restarted task has a new entry; the old one may linger until Nomad has destroyed
        # the earlier start: prefer the entry whose socket is there.
        return next((e for e in matching if os.path.exists(e.socket)), matching[-1])
