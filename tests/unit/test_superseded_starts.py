"""Which journals are stale: earlier starts of a task in the same allocation that the plugin
does not run, when the task starts again (``driver.recovery.superseded_starts``), and at a
plugin's start, tasks whose VM ended while no plugin watched (``ended_orphans``)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

from nomad_vm.driver.journal import RecordedProcess, TaskJournal
from nomad_vm.driver.orphans import ended_orphans
from nomad_vm.driver.recovery import superseded_starts
from nomad_vm.processes import ProcessIdentity, boot_id, identity_of
from nomad_vm.vm.hypervisor import VMM_ROLE
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


def test_ended_orphans_are_journals_of_ended_vms_nobody_runs_or_starts() -> None:
    """``orphans.ended_orphans``: a journal whose recorded VMM has ended, of a task this
    plugin neither runs nor is starting; not one whose VMM lives, nor one without a VMM."""
    alive = subprocess.Popen(["sleep", "60"])
    ended = subprocess.Popen(["true"])
    ended.wait()
    try:
        live_vmm = (RecordedProcess(VMM_ROLE, identity_of(alive.pid)),)
        # A pid that existed, with the start time it had: the process is gone.
        gone = ProcessIdentity(ended.pid, identity_of(alive.pid).start_ticks, boot_id())
        gone_vmm = (RecordedProcess(VMM_ROLE, gone),)
        journals = [
            replace(journal("a/vm/ended"), processes=gone_vmm),  # an orphan
            replace(journal("b/vm/live"), processes=live_vmm),  # its VM runs: recoverable
            journal("c/vm/never"),  # no VMM: a start a plugin died in
            replace(journal("d/vm/running"), processes=gone_vmm),  # this plugin runs it
            replace(journal("e/vm/starting"), processes=gone_vmm),  # being started
        ]
        found = ended_orphans(journals, busy={"d/vm/running", "e/vm/starting"})
        assert [j.task_id for j in found] == ["a/vm/ended"]
    finally:
        alive.kill()
        alive.wait()
