"""A link's traffic counters (netlink IFLA_STATS64), in the namespace it lives in.

Netlink rather than /sys/class/net/<name>/statistics: a group-mode TAP lives in the
allocation's network namespace, whose links /sys (mounted for the plugin's namespace) does
not show.
"""

from __future__ import annotations

from typing import Any

from nomad_vm.network.links import get_link, link_index, netlink_call

FIELDS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_dropped", "tx_dropped")


def link_counters(name: str, *, netns: str | None = None) -> dict[str, int] | None:
    """The counters of link ``name``; None when there is no such link. Blocking (a thread)."""

    def query(ipr: Any) -> dict[str, int] | None:
        index = link_index(ipr, name)
        if index is None:
            return None
        stats = get_link(ipr, index).get_attr("IFLA_STATS64")
        if stats is None:
            return None
        return {field: int(stats[field]) for field in FIELDS}

    return netlink_call(netns, f"cannot read the counters of {name}", query)
