"""When to grow or shrink a VM's hot-pluggable memory: a pure policy on the guest's own
figures (its total and available memory, from the balloon's statistics) and the device's
state. No I/O here: ``memory_watch`` feeds it and acts on its answers.

Grow: the guest's available memory is below ``grow_below`` of its total, or below
``min_available`` (the headroom a guest needs while the driver reacts: about 2-3 s from
the guest's figure to a plugged block, so a guest allocating faster than min_available in
that time can still run out: give it more ``memory`` for such bursts). One ``step`` more
is requested, once the previous request has been plugged and shows in the guest's total (a
guest still plugging is not asked again, which bounds the rate to what the guest can take).
Shrink: were one step removed, the guest would still have ``shrink_above`` of its (smaller)
total available and at least ``SHRINK_MARGIN`` x ``min_available``, and that has held for
``shrink_after`` seconds; one step less is requested, and the wait starts again. Both
shrink thresholds lie above the grow ones, leaving a band where nothing happens
(hysteresis): a shrink never leaves the guest in the state that makes it grow.
Never above the region (memory_max - memory), never below 0, always whole blocks.

Online: plugged memory is useless until the guest onlines it (a kernel that leaves
hot-plugged memory offline, e.g. Debian's, unless told otherwise), and such a guest would
keep running short and be plugged up to memory_max for nothing. So after each grow the
guest's total must show at least half of what was plugged since (the rest allows for
rounding) within ``online_within`` seconds of the guest's own reports (``MAX_REPORT_GAP``);
until it does, nothing more is plugged and nothing unplugged. If it does not, the policy
gives up for good (``gave_up`` says why): it asks for 0 once, so the host gets the memory
back, and then never answers again.
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
    # A grow must show up in the guest's total within this many seconds (see the docstring).
    # Onlining takes well under a second once plugged; the balloon's figures lag 1-2 s.
    online_within: float = 30.0


# A gap between two of the guest's reports counts as at most this many seconds toward
# online_within: a guest that stops reporting (stalled by memory pressure, or starved of CPU
# on a busy host) is not judged on the time it could not run.
MAX_REPORT_GAP = 2.0


@dataclass
class _Unconfirmed:
    """A grow whose memory has not shown up in the guest yet: the guest's total and the
    plugged size when it was asked, and the seconds of reports since."""

    total: int
    plugged: int
    waited: float = 0.0


DEFAULT_SETTINGS = PolicySettings()


def parse_policy_settings(block: dict[str, object]) -> PolicySettings:
    """The plugin's `memory_hotplug {}` block (schema: memory_hotplug.py)."""
    shrink_after = block.get("shrink_after")
    if not isinstance(shrink_after, int | float):
        return DEFAULT_SETTINGS
    return PolicySettings(shrink_after=float(shrink_after))


class MemoryPolicy:
    """One VM's policy; remembers since when shrinking has been possible, the last grow
    until the guest shows it, and whether it gave up."""

    def __init__(self, settings: PolicySettings = DEFAULT_SETTINGS) -> None:
        if not 0 < settings.grow_below < settings.shrink_above < 1:
            raise ValueError("need 0 < grow_below < shrink_above < 1")
        self.settings = settings
        self._calm_since: float | None = None
        self._unconfirmed: _Unconfirmed | None = None
        self._last_report: float | None = None
        # Why the policy stopped driving this VM (the guest does not online what is
        # plugged); None while it drives.
        self.gave_up: str | None = None

    def decide(self, now: float, guest: GuestMemory, hot: HotplugMemory) -> int | None:
        """The requested size to set now (bytes), or None to leave it. ``now`` is a
        monotonic clock in seconds."""
        if self.gave_up is not None:
            return None
        gap = self._report_gap(guest.reported_at or now)
        self._confirm(guest, hot)
        pending = self._unconfirmed
        if pending is not None:
            pending.waited += gap
            if pending.waited >= self.settings.online_within:
                self.gave_up = self._why_not_online(guest, hot)
                return 0 if hot.requested > 0 else None
        s = self.settings
        if guest.available < max(s.grow_below * guest.total, s.min_available):
            self._calm_since = None
            # Still plugging the last request, or what it plugged is not in the guest's
            # total yet: wait for it (an unplug under way, plugged > requested, does not
            # hold a grow back: the guest needs memory now).
            if hot.plugged < hot.requested or self._unconfirmed is not None:
                return None
            wanted = min(hot.region, max(hot.requested, hot.plugged) + s.step)
            wanted -= wanted % s.block
            if wanted <= hot.requested:
                return None
            self._unconfirmed = _Unconfirmed(guest.total, hot.plugged)
            return wanted
        step = min(s.step, hot.requested)
        if step <= 0 or hot.plugged != hot.requested or self._unconfirmed is not None:
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

    def _report_gap(self, reported_at: float) -> float:
        """Seconds since the guest's previous report (0 for the same one), at most
        MAX_REPORT_GAP."""
        last = self._last_report
        if last is not None and reported_at <= last:
            return 0.0
        self._last_report = reported_at
        return 0.0 if last is None else min(reported_at - last, MAX_REPORT_GAP)

    def _confirm(self, guest: GuestMemory, hot: HotplugMemory) -> None:
        """The last grows are confirmed once half of what was plugged since is in the
        guest's total."""
        pending = self._unconfirmed
        if pending is None:
            return
        plugged = hot.plugged - pending.plugged
        if plugged > 0 and guest.total - pending.total >= plugged // 2:
            self._unconfirmed = None

    def _why_not_online(self, guest: GuestMemory, hot: HotplugMemory) -> str:
        pending = self._unconfirmed
        assert pending is not None
        waited = self.settings.online_within
        plugged = hot.plugged - pending.plugged
        if plugged <= 0:
            return (
                f"the guest took none of the memory asked {waited:.0f} s ago "
                "(no virtio_mem driver in the guest?)"
            )
        grown = max(0, guest.total - pending.total)
        return (
            f"the guest plugged {plugged // MIB} MiB but its total memory grew by "
            f"{grown // MIB} MiB in {waited:.0f} s: it leaves hot-plugged memory offline"
        )
