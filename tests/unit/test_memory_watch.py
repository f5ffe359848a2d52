"""driver/memory_watch.py against a scripted VM: it starts from the size the VMM holds (a
restarted plugin), resizes as the policy says, says so in events, and stops when the VM has
no hot-pluggable memory or stops answering."""

from __future__ import annotations

import asyncio

from nomad_vm.driver.memory_policy import MIB, MemoryPolicy, PolicySettings
from nomad_vm.driver.memory_watch import drive_memory
from nomad_vm.errors import HypervisorError
from nomad_vm.vm.hypervisor import GuestMemory, HotplugMemory


class ScriptedVM:
    """The VMM's device state, and the guest's figures read one after another; the guest
    plugs (or unplugs) what is asked at once. Gone once the figures run out."""

    def __init__(self, requested: int, figures: list[GuestMemory], region: int = 512 * MIB):
        self.region = region
        self.requested = requested
        self.figures = figures
        self.resizes: list[int] = []

    async def hotplug_memory(self) -> HotplugMemory | None:
        if not self.figures:
            raise HypervisorError("QMP is gone")
        return HotplugMemory(self.region, self.requested, self.requested)

    async def guest_memory(self) -> GuestMemory | None:
        return self.figures.pop(0)

    async def resize_hotplug_memory(self, requested: int) -> None:
        self.resizes.append(requested)
        self.requested = requested


def run(vm: ScriptedVM, policy: MemoryPolicy) -> tuple[list[str], list[HotplugMemory]]:
    events: list[str] = []
    seen: list[HotplugMemory] = []
    asyncio.run(drive_memory(vm, 256, events.append, seen.append, policy, period=0))  # type: ignore[arg-type]
    return events, seen


def test_a_restarted_plugin_shrinks_from_what_the_vmm_holds() -> None:
    # An earlier plugin left 256 MiB plugged; the guest has plenty free now.
    roomy = GuestMemory(500 * MIB, 420 * MIB)
    vm = ScriptedVM(256 * MIB, [roomy, roomy])
    events, seen = run(vm, MemoryPolicy(PolicySettings(shrink_after=0.0)))
    assert seen[0].requested == 256 * MIB
    assert vm.resizes == [128 * MIB]
    assert events == ["Memory unplugged: -128 MiB (guest now 384 MiB of up to 768)"]


def test_grows_and_says_so() -> None:
    vm = ScriptedVM(0, [GuestMemory(200 * MIB, 20 * MIB)])
    events, _ = run(vm, MemoryPolicy())
    assert vm.resizes == [128 * MIB]
    assert events == ["Memory plugged: +128 MiB (guest now 384 MiB of up to 768)"]


def test_a_vm_without_hot_pluggable_memory_is_left_alone() -> None:
    class Fixed(ScriptedVM):
        async def hotplug_memory(self) -> HotplugMemory | None:
            return None

    vm = Fixed(0, [GuestMemory(200 * MIB, 20 * MIB)])
    assert run(vm, MemoryPolicy()) == ([], [])
    assert vm.resizes == []


def test_a_guest_that_leaves_plugged_memory_offline_gets_one_event_and_its_memory_back() -> None:
    # The guest plugs what is asked (ScriptedVM) but its total stays at 200 MiB.
    short = GuestMemory(200 * MIB, 20 * MIB)
    vm = ScriptedVM(0, [short] * 6)
    events, seen = run(vm, MemoryPolicy(PolicySettings(online_within=0.0)))
    assert vm.resizes == [128 * MIB, 0]
    assert events[0] == "Memory plugged: +128 MiB (guest now 384 MiB of up to 768)"
    (stopped,) = events[1:]
    assert stopped.startswith(
        "Memory hot-plug stopped: the guest plugged 128 MiB but its total memory grew by 0 MiB"
    )
    assert "Unplugging its 128 MiB: the guest stays at 256 MiB until the task restarts" in stopped
    assert "memhp_default_state=online_movable" in stopped and "docs/memory.md" in stopped
    # The size is still read as the guest gives it back, with no more changes.
    assert len(seen) == 7 and seen[-1].requested == 0
