"""Which journals a new start of a task makes stale: earlier starts of the same task in the
same allocation that the plugin does not run (``driver.recovery.superseded_starts``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.recovery import superseded_starts
from tests.unit.tasks import unit_task


def journal(task_id: str) -> TaskJournal:
    return TaskJournal(task_id, "qemu", started_at=0.0)


def test_only_earlier_starts_of_the_same_task_nobody_runs_are_stale(tmp_path: Path) -> None:
    task = replace(unit_task(tmp_path, name="vm"), id="a1/vm/new", alloc_id="a1")
    journals = [
        journal("a1/vm/old"),  # Nomad gave up on it: stale
        journal("a1/vm/new"),  # the start itself (a half-done earlier try: undone by id)
        journal("a1/vm/live"),  # this plugin runs it: not ours to touch
        journal("a1/web/old"),  # another task of the allocation
        journal("a1/vmx/old"),  # a task whose name starts with the same letters
        journal("a10/vm/old"),  # an allocation whose id starts with the same characters
        journal("b2/vm/old"),  # another allocation
    ]
    stale = superseded_starts(journals, task, running={"a1/vm/live"})
    assert [j.task_id for j in stale] == ["a1/vm/old"]


def test_nothing_is_stale_without_earlier_starts(tmp_path: Path) -> None:
    task = replace(unit_task(tmp_path, name="vm"), id="a1/vm/new", alloc_id="a1")
    assert superseded_starts([journal("a1/vm/new")], task, running=set()) == []
