"""Reserved cores -> the vCPUs' pins: the cpuset list, and pin_vcpus's refusals (a monitor
stand-in answers query-cpus-fast; no thread is pinned when the counts differ)."""

from __future__ import annotations

import asyncio

import pytest

from nomad_vm.driver.resources import expand_cpuset
from nomad_vm.errors import LaunchError
from nomad_vm.vm.qemu.pinning import pin_vcpus


@pytest.mark.parametrize(
    ("cpuset", "cpus"),
    [("", ()), ("3", (3,)), ("0-2,5", (0, 1, 2, 5)), (" 1 , 4-5", (1, 4, 5))],
)
def test_cpuset_lists_expand_in_order(cpuset: str, cpus: tuple[int, ...]) -> None:
    assert expand_cpuset(cpuset) == cpus


class Monitor:
    def __init__(self, answer: list[dict[str, object]]) -> None:
        self.answer = answer

    async def execute(self, command: str) -> object:
        assert command == "query-cpus-fast"
        return self.answer


def test_a_vcpu_count_unlike_the_cores_is_a_launch_error() -> None:
    monitor = Monitor([{"cpu-index": 0, "thread-id": 1}])
    with pytest.raises(LaunchError, match="1 vCPUs for 2 reserved cores"):
        asyncio.run(pin_vcpus(monitor, (0, 1)))  # type: ignore[arg-type]


def test_a_thread_that_cannot_be_pinned_is_a_launch_error() -> None:
    # A thread id no process has: sched_setaffinity fails (ESRCH).
    monitor = Monitor([{"cpu-index": 0, "thread-id": 2**22 + 7}])
    with pytest.raises(LaunchError, match="cannot pin vCPU thread"):
        asyncio.run(pin_vcpus(monitor, (0,)))  # type: ignore[arg-type]
