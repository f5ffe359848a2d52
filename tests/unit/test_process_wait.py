"""Waiting for a VMM's end never rests on the event loop's registration of its pidfd alone
(``nomad_vm.vm.process``): a reattached VM whose end went unnoticed once left Nomad waiting
for the task forever (the cluster chaos run)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator

import pytest

from nomad_vm.processes import identity_of
from nomad_vm.vm import process as process_module
from nomad_vm.vm.process import SupervisedProcess, reattach


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def sleeper(
    started: list[subprocess.Popen[bytes]],
) -> tuple[subprocess.Popen[bytes], SupervisedProcess]:
    """A process found the way a new plugin finds a VMM (by identity, not as its child)."""
    proc = subprocess.Popen(["sleep", "600"])
    started.append(proc)
    ident = identity_of(proc.pid)
    assert ident is not None
    return proc, reattach(ident)


def end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()  # reaped: no zombie left for the liveness check to see


def test_the_end_is_seen_through_the_pidfd(sleepers: list[subprocess.Popen[bytes]]) -> None:
    async def scenario() -> str:
        proc, supervised = sleeper(sleepers)
        waiting = asyncio.ensure_future(supervised.wait())
        await asyncio.sleep(0.05)
        assert not waiting.done()
        end(proc)
        ended = await asyncio.wait_for(waiting, 5)
        return ended.reason

    assert "not the plugin's child" in asyncio.run(scenario())


def test_an_end_the_loop_never_reports_is_still_seen(
    sleepers: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registration lost (as when asyncio keeps a stale one for a reused descriptor
    number): the liveness check ends the wait anyway."""
    monkeypatch.setattr(process_module, "LIVENESS_CHECK", 0.1)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "add_reader", lambda fd, callback: None)
        monkeypatch.setattr(loop, "remove_reader", lambda fd: False)
        proc, supervised = sleeper(sleepers)
        waiting = asyncio.ensure_future(supervised.wait())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # alive: the checks keep waiting
        end(proc)
        await asyncio.wait_for(waiting, 5)

    asyncio.run(scenario())


def test_closing_a_waited_process_leaves_the_next_ones_wait_intact(
    sleepers: list[subprocess.Popen[bytes]],
) -> None:
    """A process closed while waited on (its waiter cancelled), then a new one that may get
    the same descriptor number: the new one's end is reported at once, by its pidfd."""

    async def scenario() -> None:
        _, first = sleeper(sleepers)
        first_waiting = asyncio.ensure_future(first.wait())
        await asyncio.sleep(0.05)
        first.close()
        proc, second = sleeper(sleepers)
        second_waiting = asyncio.ensure_future(second.wait())
        await asyncio.sleep(0.05)
        end(proc)
        # Well within LIVENESS_CHECK: the pidfd itself reported it.
        await asyncio.wait_for(second_waiting, process_module.LIVENESS_CHECK / 2)
        first_waiting.cancel()

    asyncio.run(scenario())
