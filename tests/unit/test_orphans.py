"""``driver/orphans.UnclaimedJournals``: when a journal an earlier plugin left counts as
nobody's (the grace after start-up, and a quiet recovery round), on a clock the test moves.
Through a real plugin and each backend: tests/conformance/test_orphan_contract.py."""

from __future__ import annotations

from nomad_vm.driver.orphans import RECOVERY_QUIET, UNCLAIMED_GRACE, UnclaimedJournals


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nothing_is_due_before_the_grace_and_what_nomad_claimed_never_is() -> None:
    clock = Clock()
    unclaimed = UnclaimedJournals(clock)
    unclaimed.watch(["a/vm/1", "b/vm/1", "c/vm/1"])
    clock.now += UNCLAIMED_GRACE - 1
    assert unclaimed.due(busy=()) == set()
    unclaimed.claim("a/vm/1")  # RecoverTask
    clock.now += RECOVERY_QUIET + 1
    # Past the grace and quiet: c is due; b is busy (a start of it is under way).
    assert unclaimed.due(busy={"b/vm/1"}) == {"c/vm/1"}
    # Due once: nothing is watched any more.
    assert not unclaimed.pending and unclaimed.due(busy=()) == set()


def test_a_recovery_round_still_going_defers_the_sweep() -> None:
    clock = Clock()
    unclaimed = UnclaimedJournals(clock)
    unclaimed.watch(["a/vm/1", "b/vm/1"])
    clock.now += UNCLAIMED_GRACE + 1
    unclaimed.claim("a/vm/1")  # Nomad is still recovering tasks
    assert unclaimed.due(busy=()) == set()
    clock.now += RECOVERY_QUIET + 1
    assert unclaimed.due(busy=()) == {"b/vm/1"}


def test_nothing_watched_is_nothing_pending() -> None:
    unclaimed = UnclaimedJournals(Clock())
    unclaimed.watch([])
    assert not unclaimed.pending
