"""When to grow or shrink a VM's hot-pluggable memory: a pure policy on the guest's own
figures (its total and available memory, from the balloon's statistics) and the device's
state. No I/O here: ``memory_watch`` feeds it and acts on its answers.

Grow: the guest's available memory is below ``grow_below`` of its total, or below
``min_available`` (the headroom a guest needs while the driver reacts: about 2-3 s from
the guest's figure to a plugged block, so a guest allocating faster than min_available in
that time can still run out: give it more ``memory`` for such bursts). One ``step`` more
is requested, once the previous request has been plugged (a guest still plugging is not asked
again, which bounds the rate to what the guest can take).
Shrink: were one step removed, the guest would still have ``shrink_above`` of its (smaller)
total available and at least ``SHRINK_MARGIN`` x ``min_available``, and that has held for
``shrink_after`` seconds; one step less is requested, and the wait starts again. Both
shrink thresholds lie above the grow ones, leaving a band where nothing happens
(hysteresis): a shrink never leaves the guest in the state that makes it grow.
Never above the region (memory_max - memory), never below 0, always whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from nomad_vm.vm.hypervisor import GuestMemory, HotplugMemory

MIB = 1 << 20
# A shrink must leave this much more than min_available (the absolute threshold's own band;
# more would keep a small guest, whose boot size leaves little free, from ever getting back
# to it: the tiny test guest has about 120 MiB available at 256 MB).
SHRINK_MARGIN = 1.25


@dataclass(frozen=True)
class PolicySettings:
    # How much one change plugs or unplugs (the last step may be smaller: the region's rest).
    step: int = 128 * MIB
    # Grow while available / total is below this.
    grow_below: float = 0.20
    # ... or while available is below this.
    min_available: int = 80 * MIB
    # Shrink when, one step less, available / total would still be at least this ...
    shrink_above: float = 0.40
    # ... continuously for this many seconds.
    shrink_after: float = 10.0
    # The device's block size: every request is a multiple of it.
    block: int = 2 * MIB


DEFAULT_SETTINGS = PolicySettings()


class MemoryPolicy:
    """One VM's policy; remembers only since when shrinking has been possible."""

    def __init__(self, settings: PolicySettings = DEFAULT_SETTINGS) -> None:
        if not 0 < settings.grow_below < settings.shrink_above < 1:
            raise ValueError("need 0 < grow_below < shrink_above < 1")
        self.settings = settings
        self._calm_since: float | None = None

    def decide(self, now: float, guest: GuestMemory, hot: HotplugMemory) -> int | None:
        """The requested size to set now (bytes), or None to leave it. ``now`` is a
        monotonic clock in seconds."""
        s = self.settings
        if guest.available < max(s.grow_below * guest.total, s.min_available):
            self._calm_since = None
            # Still plugging the last request: wait for it (an unplug under way, plugged >
            # requested, does not hold a grow back: the guest needs memory now).
            if hot.plugged < hot.requested:
                return None
            wanted = min(hot.region, max(hot.requested, hot.plugged) + s.step)
            wanted -= wanted % s.block
            return wanted if wanted > hot.requested else None
        step = min(s.step, hot.requested)
        if step <= 0 or hot.plugged != hot.requested:
            self._calm_since = None
            return None
        would_have = guest.available - step
        floor = max(s.shrink_above * (guest.total - step), SHRINK_MARGIN * s.min_available)
        if would_have < floor:
            self._calm_since = None
            return None
        if self._calm_since is None:
            self._calm_since = now
            return None
        if now - self._calm_since < s.shrink_after:
            return None
        self._calm_since = now
        wanted = hot.requested - step
        return wanted - wanted % s.block
