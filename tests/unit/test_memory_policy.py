"""The hot-pluggable memory policy (driver/memory_policy.py), the task's memory_max
(driver/resources.py) and its refusal on backends without hot-plug."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import pytest

from nomad_vm.driver.config import parse_plugin_config
from nomad_vm.driver.memory_policy import DEFAULT_SETTINGS, MIB, MemoryPolicy, PolicySettings
from nomad_vm.driver.memory_watch import change_event
from nomad_vm.driver.resources import memory_max_mb_for
from nomad_vm.driver.startup import StartPlan, plan_start
from nomad_vm.driver.types import AgentInfo, TaskResources
from nomad_vm.errors import ConfigError
from nomad_vm.plugin import convert
from nomad_vm.plugin.proto import driver_pb2
from nomad_vm.vm.hypervisor import GuestMemory, HotplugMemory
from nomad_vm.vm.registry import HypervisorRegistry
from tests.fakes.hypervisor import FakeHost
from tests.unit.tasks import unit_task
from tests.unit.test_free_page_reporting import QemuCapabilities
from tests.unit.test_hypervisor_choice import KvmOnly

REGION = 512 * MIB
STEP = 128 * MIB


def guest(total_mib: int, available_mib: int) -> GuestMemory:
    return GuestMemory(total=total_mib * MIB, available=available_mib * MIB)


def hot(requested_mib: int, plugged_mib: int | None = None) -> HotplugMemory:
    plugged = requested_mib if plugged_mib is None else plugged_mib
    return HotplugMemory(region=REGION, requested=requested_mib * MIB, plugged=plugged * MIB)


def test_grows_one_step_when_available_memory_runs_short() -> None:
    policy = MemoryPolicy()
    assert policy.decide(0.0, guest(240, 30), hot(0)) == STEP


def test_does_not_grow_again_until_the_last_request_is_plugged() -> None:
    policy = MemoryPolicy()
    assert policy.decide(0.0, guest(240, 30), hot(128, plugged_mib=64)) is None
    assert policy.decide(1.0, guest(368, 30), hot(128)) == 256 * MIB


def test_never_above_the_region() -> None:
    policy = MemoryPolicy()
    assert policy.decide(0.0, guest(700, 10), hot(448)) == REGION
    assert policy.decide(1.0, guest(752, 10), hot(512)) is None


def test_grows_even_while_an_unplug_is_under_way() -> None:
    # The guest freed, an unplug was asked (256 -> 128) and is not done; now it runs short.
    policy = MemoryPolicy()
    assert policy.decide(0.0, guest(496, 40), hot(128, plugged_mib=256)) == 384 * MIB


def test_shrinks_only_after_plenty_has_been_available_for_a_while() -> None:
    policy = MemoryPolicy(PolicySettings(shrink_after=10.0))
    roomy = guest(496, 400)
    assert policy.decide(0.0, roomy, hot(256)) is None
    assert policy.decide(9.0, roomy, hot(256)) is None
    assert policy.decide(10.0, roomy, hot(256)) == 128 * MIB
    # The wait starts again after each step.
    assert policy.decide(11.0, guest(368, 330), hot(128)) is None
    assert policy.decide(20.5, guest(368, 330), hot(128)) == 0


def test_a_dip_restarts_the_shrink_wait() -> None:
    policy = MemoryPolicy(PolicySettings(shrink_after=10.0))
    assert policy.decide(0.0, guest(496, 400), hot(256)) is None
    assert policy.decide(5.0, guest(496, 200), hot(256)) is None  # one step less: too tight
    assert policy.decide(12.0, guest(496, 400), hot(256)) is None
    assert policy.decide(22.0, guest(496, 400), hot(256)) == 128 * MIB


def test_hysteresis_a_shrink_never_leads_straight_to_a_grow() -> None:
    # Between the thresholds nothing happens, and a shrink leaves the guest above grow_below.
    settings = PolicySettings(shrink_after=0.0)
    policy = MemoryPolicy(settings)
    assert policy.decide(0.0, guest(496, 150), hot(256)) is None  # 22/368 < 0.4: keep
    for available in range(0, 497, 8):
        state = guest(496, available)
        wanted = MemoryPolicy(settings).decide(0.0, state, hot(256))
        policy.decide(0.0, state, hot(256))
        if wanted is not None and wanted < 256 * MIB:
            left = state.available - (256 * MIB - wanted)
            assert left >= settings.grow_below * (state.total - (256 * MIB - wanted))


def test_never_below_zero_and_nothing_to_shrink_at_zero() -> None:
    policy = MemoryPolicy(PolicySettings(shrink_after=0.0))
    assert policy.decide(0.0, guest(240, 200), hot(0)) is None
    assert policy.decide(1.0, guest(240, 200), hot(0)) is None


def test_requests_are_whole_blocks() -> None:
    policy = MemoryPolicy(PolicySettings(step=100 * MIB + 12345))
    wanted = policy.decide(0.0, guest(240, 10), hot(0))
    assert wanted is not None and wanted % (2 * MIB) == 0


def test_thresholds_must_leave_a_band() -> None:
    with pytest.raises(ValueError):
        MemoryPolicy(PolicySettings(grow_below=0.5, shrink_above=0.4))


def test_change_events_say_the_size_and_the_limit() -> None:
    h = hot(0)
    assert change_event(0, 256 * MIB, 256, h) == (
        "Memory plugged: +256 MiB (guest now 512 MiB of up to 768)"
    )
    assert change_event(256 * MIB, 128 * MIB, 256, h) == (
        "Memory unplugged: -128 MiB (guest now 384 MiB of up to 768)"
    )


@pytest.mark.parametrize(
    ("memory", "memory_max", "expected"), [(256, 0, None), (256, 256, None), (256, 768, 768)]
)
def test_memory_max_is_hot_pluggable_only_above_memory(
    memory: int, memory_max: int, expected: int | None
) -> None:
    res = TaskResources(cpu_mhz=100, memory_mb=memory, memory_max_mb=memory_max)
    assert memory_max_mb_for(res) == expected


def test_memory_max_must_leave_whole_blocks() -> None:
    res = TaskResources(cpu_mhz=100, memory_mb=256, memory_max_mb=767)
    with pytest.raises(ConfigError) as caught:
        memory_max_mb_for(res)
    assert caught.value.field == "resources.memory_max"
    assert "multiple of 2 MB" in str(caught.value)


def plan_with_memory_max(tmp_path: Path, memory_max: int, options: dict[str, object]) -> StartPlan:
    """A task of 128 MB with Nomad's memory_max, planned through the driver (fake host)."""
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "vmlinux").write_bytes(b"x")
    config = parse_plugin_config(
        {"data_dir": str(tmp_path / "data"), "image_paths": [str(tmp_path / "images")]}
    )
    task = unit_task(
        tmp_path / "alloc",
        {"share_task_dirs": False, "kernel": str(tmp_path / "images" / "vmlinux"), **options},
    )
    task = replace(task, resources=replace(task.resources, memory_max_mb=memory_max))
    host = FakeHost()
    backends = HypervisorRegistry(
        {"qemu": lambda: QemuCapabilities(host), "cloud-hypervisor": lambda: KvmOnly(host)},
        default="qemu",
    )
    return asyncio.run(plan_start(task, config, AgentInfo(), tmp_path / "run", backends))


def test_memory_max_reaches_the_request(tmp_path: Path) -> None:
    assert plan_with_memory_max(tmp_path, 512, {}).vm_plan.request.memory_max_mb == 512
    assert plan_with_memory_max(tmp_path, 0, {}).vm_plan.request.memory_max_mb is None


def test_cloud_hypervisor_refuses_memory_max_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        plan_with_memory_max(tmp_path, 512, {"hypervisor": "cloud-hypervisor"})
    assert caught.value.field == "resources.memory_max"
    assert not (tmp_path / "run").exists()


def test_nomad_sends_memory_max_in_the_allocated_resources() -> None:
    pb = driver_pb2.TaskConfig(
        id="x",
        resources=driver_pb2.Resources(
            allocated_resources=driver_pb2.AllocatedTaskResources(
                memory=driver_pb2.AllocatedMemoryResources(memory_mb=256, memory_max_mb=768)
            )
        ),
    )
    assert convert.task_config(pb).resources.memory_max_mb == 768


def test_a_small_guest_grows_before_its_headroom_is_gone() -> None:
    # 150 MiB total, 70 free: 47% free, but less than the 80 MiB the reaction time needs.
    assert MemoryPolicy().decide(0.0, guest(150, 70), hot(0)) == STEP
    assert MemoryPolicy().decide(0.0, guest(150, 100), hot(0)) is None


# --- a guest that does not online what is plugged -------------------------------------------


def test_a_grow_that_shows_in_the_guests_total_lets_the_next_one_through() -> None:
    policy = MemoryPolicy(PolicySettings(online_within=30.0))
    assert policy.decide(0.0, guest(240, 30), hot(0)) == STEP
    # Plugged, but the guest's figures do not show it yet: no second grow meanwhile.
    assert policy.decide(1.0, guest(240, 30), hot(128)) is None
    assert policy.decide(2.0, guest(368, 30), hot(128)) == 256 * MIB
    assert policy.gave_up is None


def test_plugged_memory_the_guest_leaves_offline_is_unplugged_once_with_a_reason() -> None:
    policy = MemoryPolicy(PolicySettings(online_within=30.0))
    assert policy.decide(0.0, guest(240, 30), hot(0)) == STEP
    # The guest plugged the block but its total never grows: it keeps running short, and
    # nothing more is plugged while the bound runs.
    for now in range(1, 30):
        assert policy.decide(float(now), guest(240, 30), hot(128)) is None
    assert policy.gave_up is None
    assert policy.decide(30.0, guest(240, 30), hot(128)) == 0
    assert policy.gave_up is not None
    assert "plugged 128 MiB but its total memory grew by 0 MiB in 30 s" in policy.gave_up
    assert "offline" in policy.gave_up
    # Given up for good: neither the same shortage nor plenty changes anything any more.
    assert policy.decide(31.0, guest(240, 30), hot(0, plugged_mib=128)) is None
    assert policy.decide(99.0, guest(240, 30), hot(0)) is None


def test_a_guest_that_takes_nothing_is_given_up_on_too() -> None:
    # No virtio_mem driver in the guest: the request is never plugged.
    policy = MemoryPolicy(PolicySettings(online_within=30.0))
    assert policy.decide(0.0, guest(240, 30), hot(0)) == STEP
    for now in range(1, 30):
        assert policy.decide(float(now), guest(240, 30), hot(128, plugged_mib=0)) is None
    assert policy.decide(30.0, guest(240, 30), hot(128, plugged_mib=0)) == 0
    assert policy.gave_up is not None and "took none" in policy.gave_up


def test_nothing_is_unplugged_before_the_last_grow_shows() -> None:
    # Plenty available at once (the workload ended) but the grow is unconfirmed: no shrink.
    policy = MemoryPolicy(PolicySettings(shrink_after=0.0, online_within=30.0))
    assert policy.decide(0.0, guest(240, 30), hot(0)) == STEP
    assert policy.decide(1.0, guest(240, 200), hot(128)) is None
    assert policy.decide(2.0, guest(240, 200), hot(128)) is None
    # Once it shows, shrinking goes on as usual.
    assert policy.decide(3.0, guest(368, 330), hot(128)) is None  # the calm starts
    assert policy.decide(3.0, guest(368, 330), hot(128)) == 0
    assert policy.gave_up is None


def test_half_of_the_plugged_memory_is_enough_to_count_as_online() -> None:
    policy = MemoryPolicy(PolicySettings(online_within=30.0))
    assert policy.decide(0.0, guest(240, 30), hot(0)) == STEP
    assert policy.decide(1.0, guest(240 + 63, 30), hot(128)) is None
    assert policy.decide(31.0, guest(240 + 64, 30), hot(128)) == 256 * MIB
    assert policy.gave_up is None


def test_only_time_the_guest_reported_in_counts_toward_the_bound() -> None:
    # The guest stalls for a minute right after the grow (memory pressure, a busy host): its
    # balloon sends nothing meanwhile, and that minute counts as one 2 s gap.
    policy = MemoryPolicy(PolicySettings(online_within=30.0))

    def at(reported: float, total: int = 240) -> GuestMemory:
        return GuestMemory(total * MIB, 30 * MIB, reported_at=reported)

    assert policy.decide(0.0, at(1000.0), hot(0)) == STEP
    for now in range(1, 61):
        assert policy.decide(float(now), at(1000.0), hot(128)) is None  # the same report
    assert policy.decide(61.0, at(1060.0), hot(128)) is None
    assert policy.gave_up is None
    # Reporting again, onlining nothing: 28 more seconds of reports end it.
    for second in range(1, 28):
        assert policy.decide(61.0 + second, at(1060.0 + second), hot(128)) is None
    assert policy.decide(89.0, at(1088.0), hot(128)) == 0
    assert policy.gave_up is not None


def test_the_operator_sets_how_long_spare_memory_waits_before_it_is_unplugged() -> None:
    assert parse_plugin_config({}).memory_policy == DEFAULT_SETTINGS
    assert DEFAULT_SETTINGS.shrink_after == 10.0
    config = parse_plugin_config({"memory_hotplug": {"shrink_after": 3}})
    assert config.memory_policy == PolicySettings(shrink_after=3.0)
    with pytest.raises(ConfigError, match=r"memory_hotplug\.shrink_after"):
        parse_plugin_config({"memory_hotplug": {"shrink_after": 0}})
