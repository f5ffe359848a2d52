"""Port forwards (DNAT) to guests and what guests may send, in two nftables tables the plugin
owns (``ip nomad_vm`` and ``bridge nomad_vm``).

Driven through ``nft -j``: requests go in as JSON on stdin, the ruleset comes back as JSON, so
nothing parses nft's text output. Every change is one ``nft -f`` batch, which the kernel
applies atomically: a task's old rules are deleted and its new ones added in the same
transaction, and the batch also re-declares the tables and chains, so a table deleted behind
our back comes back instead of failing the change.

The tables::

    table ip nomad_vm {
      chain guard       { type filter hook prerouting priority -150; }  # see prepare_bridge
      chain prerouting  { type nat hook prerouting priority dstnat; }   # from other machines
      chain output      { type nat hook output priority -100; }         # from this host
      chain postrouting { type nat hook postrouting priority srcnat; }  # masquerades
    }
    table bridge nomad_vm {
      chain guests      { type filter hook prerouting priority -200; }  # see set_guest_guard
    }

What a guest may send (``set_guest_guard``): see nomad_vm.network.nft_rules.

A forward ``host_port -> guest_ip:guest_port`` is a DNAT rule in ``prerouting`` (traffic
arriving from elsewhere) and the same rule in ``output``: locally generated packets never pass
the prerouting hook, so without it ``curl localhost:PORT`` on the host would not be forwarded.
Both match ``fib daddr type local`` (any address of this host, 127.0.0.1 included), or the
forward's ``host_ip``, so traffic merely routed through the host keeps its destination.

Connections from the host to 127.0.0.1 need two more things, found by trying in namespaces
(``tests/integration/test_network_layer.py``):

* After DNAT the packet still has source 127.0.0.1 and must leave through the bridge. The
  kernel refuses to route loopback addresses off the loopback device (the connection just
  times out) unless ``net.ipv4.conf.<bridge>.route_localnet=1``. ``prepare_bridge`` sets it.
* The guest must not see 127.0.0.1 as the source either: it would answer its own loopback. So
  ``postrouting`` masquerades these connections to the bridge's address; the reply comes back
  to the host, and conntrack maps it back to 127.0.0.1.

``route_localnet`` has a price (CVE-2020-8558, the same hole in kube-proxy): with it, the host
accepts packets from the bridge addressed to 127.0.0.0/8, so a guest could reach services the
host binds to localhost only. ``prepare_bridge`` therefore also adds ``guard`` rules that drop
packets arriving on the bridge with a loopback source or destination. They run before NAT:
our own replies arrive addressed to the bridge's address and only become 127.0.0.1 later.

Rules are tagged with a comment: ``nomad-vm:<hash of the owner>`` (``names.rule_tag``) for a
task's forwards and its guest guard (in both tables), ``nomad-vm:bridge:<name>`` and
``nomad-vm:nat:<name>`` for a bridge's rules. Removal goes by the handles of the rules
carrying the tag.

Forwarding to a guest also needs ``net.ipv4.ip_forward=1`` (``sysctl.enable_ip_forward``) for
traffic from other machines. A drop in another table (a ``forward`` chain with policy drop, as
Docker installs) still drops our forwarded packets: accepting in one table does not override a
drop in another.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from nomad_vm.errors import NetworkError
from nomad_vm.network import sysctl
from nomad_vm.network.names import is_owner_tag, rule_tag
from nomad_vm.network.netns import run_in
from nomad_vm.network.nft_rules import (
    LOOPBACK,
    PortForward,
    field,
    forward_rules,
    guest_guard_exprs,
    match,
    prefix,
)

DEFAULT_TABLE = "nomad_vm"
FAMILY = "ip"
BRIDGE_FAMILY = "bridge"
FAMILIES = (FAMILY, BRIDGE_FAMILY)
NFT_TIMEOUT = 30.0
# name, type, hook, priority, family (the numbers behind raw/mangle/dstnat/srcnat/filter: nft
# 1.0.6's JSON input wants numbers). Chain names are unique across the two tables.
CHAINS = (
    ("guard", "filter", "prerouting", -150, FAMILY),
    ("prerouting", "nat", "prerouting", -100, FAMILY),
    ("output", "nat", "output", -100, FAMILY),
    ("postrouting", "nat", "postrouting", 100, FAMILY),
    ("guests", "filter", "prerouting", -200, BRIDGE_FAMILY),
)
CHAIN_FAMILY = {name: family for name, _, _, _, family in CHAINS}
# What nft says (in the C locale) when a table it is asked about does not exist.
_MISSING = "No such file or directory"


@dataclass(frozen=True)
class Rule:
    """One rule of the tables as nft lists it; ``expr`` is nft's JSON expression list."""

    chain: str
    handle: int
    comment: str | None
    expr: tuple[Any, ...]
    family: str = FAMILY


class PortForwarder:
    """The plugin's nftables tables in the plugin's namespace, or in ``netns``."""

    def __init__(
        self, table: str = DEFAULT_TABLE, netns: str | None = None, nft: str | None = None
    ) -> None:
        self.table = table
        self.netns = netns
        self._nft = nft

    # -- the table ---------------------------------------------------------------------------

    def ensure_table(self) -> None:
        """Create the tables and their chains if missing (never touching existing rules)."""
        self._apply(self._declare())

    def delete_table(self) -> None:
        """Delete the tables with all their rules; nothing happens if there are none."""
        # "add" then "delete" in one batch: deletes whether or not the table existed (nft 1.0.6
        # has no "destroy").
        commands: list[dict[str, Any]] = []
        for family in FAMILIES:
            table = {"family": family, "name": self.table}
            commands += [{"add": {"table": table}}, {"delete": {"table": table}}]
        self._apply(commands)

    def rules(self, owner: str | None = None, family: str | None = None) -> list[Rule]:
        """The tables' rules, or only ``owner``'s, or only one ``family``'s; empty when the
        tables do not exist."""
        tag = rule_tag(owner) if owner is not None else None
        return [
            r
            for r in self._list()
            if (tag is None or r.comment == tag) and (family is None or r.family == family)
        ]

    # -- per task ----------------------------------------------------------------------------

    def set_port_forwards(
        self, owner: str, guest_ip: IPv4Address, forwards: Iterable[PortForward]
    ) -> None:
        """Make ``owner``'s forwards exactly ``forwards`` to ``guest_ip`` (replacing earlier ones).

        Replacing rather than adding, so a retried start cannot leave duplicate rules.
        """
        self._replace(rule_tag(owner), forward_rules(guest_ip, forwards), FAMILY)

    def set_guest_guard(self, owner: str, tap: str, guest_mac: str, guest_ip: IPv4Address) -> int:
        """Let the guest behind ``tap`` send only from ``guest_mac`` and ``guest_ip`` (see the
        module's docstring), replacing ``owner``'s earlier guard; returns how many rules that
        guard had (0: it was missing). The TAP need not exist yet: rules match its name."""
        new = [("guests", expr) for expr in guest_guard_exprs(tap, guest_mac, guest_ip)]
        return self._replace(rule_tag(owner), new, BRIDGE_FAMILY)

    def set_task_rules(
        self,
        owner: str,
        tap: str,
        guest_mac: str,
        guest_ip: IPv4Address,
        forwards: Iterable[PortForward] = (),
    ) -> None:
        """``set_guest_guard`` and ``set_port_forwards`` in one transaction (all of ``owner``'s
        rules replaced): a task's rules come and go together."""
        guard = [("guests", expr) for expr in guest_guard_exprs(tap, guest_mac, guest_ip)]
        self._replace(rule_tag(owner), guard + forward_rules(guest_ip, forwards))

    def remove_rules(self, owner: str) -> int:
        """Delete ``owner``'s rules (forwards and guard); returns how many there were (0:
        nothing to do)."""
        return self._replace(rule_tag(owner), [])

    def reconcile(self, live_owners: set[str]) -> list[str]:
        """Delete the rules of every task not in ``live_owners``; returns the tags removed.

        Bridge rules (``prepare_bridge``, ``enable_nat``) are left alone.
        """
        live = {rule_tag(owner) for owner in live_owners}
        for _ in range(2):
            rules = self._list()
            dead = [r for r in rules if r.comment and is_owner_tag(r.comment)]
            dead = [r for r in dead if r.comment not in live]
            if not dead:
                return []
            try:
                self._apply(self._delete(dead))
            except NetworkError:
                continue  # a rule went away meanwhile: list again
            return sorted({str(r.comment) for r in dead})
        raise NetworkError(f"cannot remove stale rules from nftables table {self.table}")

    # -- per bridge --------------------------------------------------------------------------

    def prepare_bridge(self, bridge: str, subnet: IPv4Network) -> None:
        """Let ports forwarded to guests on ``bridge`` work from localhost and from the guests.

        * ``guard``: drop packets from the bridge with a loopback source or destination, then
          (in that order, so the hole never opens unguarded) set ``route_localnet`` on the
          bridge (see the module's docstring);
        * ``postrouting``: masquerade DNATed connections from the bridge's subnet back into it
          (hairpin: a guest using a forwarded port of the host, maybe its own). Without it the
          guest that answers would reply directly to the client, which expects the reply
          from the host's address and resets the connection. Under br_netfilter the guest's
          bridge port also needs hairpin mode (``taps.attach_to_bridge``, on by default).
        """
        subnet_prefix = prefix(subnet)
        iif = match({"meta": {"key": "iifname"}}, bridge)
        new: list[tuple[str, list[Any]]] = [
            ("guard", [iif, match(field("ip", "saddr"), prefix(LOOPBACK)), {"drop": None}]),
            ("guard", [iif, match(field("ip", "daddr"), prefix(LOOPBACK)), {"drop": None}]),
            (
                "postrouting",
                [
                    match(field("ip", "saddr"), subnet_prefix),
                    match(field("ip", "daddr"), subnet_prefix),
                    match({"ct": {"key": "status"}}, "dnat", op="in"),
                    {"masquerade": None},
                ],
            ),
        ]
        self._replace(f"nomad-vm:bridge:{bridge}", new, FAMILY)
        sysctl.enable_route_localnet(bridge, netns=self.netns)

    def has_loopback_guard(self, bridge: str) -> bool:
        """Are ``prepare_bridge``'s two guard rules for ``bridge`` in place? (Gone, e.g. after
        ``nft flush ruleset``, the bridge's route_localnet lets guests reach 127.0.0.1.)"""
        tag = f"nomad-vm:bridge:{bridge}"
        return len([r for r in self._list() if r.chain == "guard" and r.comment == tag]) == 2

    def enable_nat(self, subnet: IPv4Network, bridge: str) -> None:
        """Masquerade the guests' traffic to anywhere but their bridge (outbound NAT)."""
        rule = [
            match(field("ip", "saddr"), prefix(subnet)),
            match({"meta": {"key": "oifname"}}, bridge, op="!="),
            {"masquerade": None},
        ]
        self._replace(f"nomad-vm:nat:{bridge}", [("postrouting", rule)], FAMILY)

    def disable_nat(self, bridge: str) -> None:
        self._replace(f"nomad-vm:nat:{bridge}", [], FAMILY)

    # -- nft ---------------------------------------------------------------------------------

    def _replace(
        self, tag: str, new: list[tuple[str, list[Any]]], family: str | None = None
    ) -> int:
        """Swap the rules tagged ``tag`` (in ``family``'s table, or both) for ``new`` in one
        transaction; returns how many went.

        Retried once: a rule deleted by someone else between listing and the batch fails the
        whole batch, and the second listing no longer has it.
        """
        last: NetworkError | None = None
        for _ in range(2):
            old = [
                r
                for r in self._list()
                if r.comment == tag and (family is None or r.family == family)
            ]
            if not old and not new:
                return 0
            commands = self._declare() + self._delete(old)
            for chain, expr in new:
                rule = {
                    "family": CHAIN_FAMILY[chain],
                    "table": self.table,
                    "chain": chain,
                    "comment": tag,
                    "expr": expr,
                }
                commands.append({"add": {"rule": rule}})
            try:
                self._apply(commands)
            except NetworkError as exc:
                last = exc
                continue
            return len(old)
        assert last is not None
        raise last

    def _declare(self) -> list[dict[str, Any]]:
        commands: list[dict[str, Any]] = [
            {"add": {"table": {"family": family, "name": self.table}}} for family in FAMILIES
        ]
        for name, kind, hook, prio, family in CHAINS:
            chain = {
                "family": family,
                "table": self.table,
                "name": name,
                "type": kind,
                "hook": hook,
                "prio": prio,
                "policy": "accept",
            }
            commands.append({"add": {"chain": chain}})
        return commands

    def _delete(self, rules: Iterable[Rule]) -> list[dict[str, Any]]:
        return [
            {
                "delete": {
                    "rule": {
                        "family": r.family,
                        "table": self.table,
                        "chain": r.chain,
                        "handle": r.handle,
                    }
                }
            }
            for r in rules
        ]

    def _list(self) -> list[Rule]:
        found = []
        for family in FAMILIES:
            for item in self._query(["list", "table", family, self.table], missing_ok=True):
                rule = item.get("rule")
                if rule is not None:
                    found.append(
                        Rule(
                            chain=str(rule["chain"]),
                            handle=int(rule["handle"]),
                            comment=rule.get("comment"),
                            expr=tuple(rule.get("expr", ())),
                            family=family,
                        )
                    )
        return found

    def _query(self, args: list[str], missing_ok: bool = False) -> list[dict[str, Any]]:
        """nft's JSON answer to ``args``; with ``missing_ok`` no items when what they name does
        not exist (one nft run instead of asking first)."""
        out = self._run(["-j", *args], None, missing_ok)
        if out is None:
            return []
        try:
            items = json.loads(out)["nftables"]
        except (ValueError, KeyError, TypeError) as exc:
            raise NetworkError(f"nft {' '.join(args)} printed no nftables JSON: {exc}") from exc
        return [item for item in items if isinstance(item, dict)]

    def _apply(self, commands: list[dict[str, Any]]) -> None:
        self._run(["-j", "-f", "-"], json.dumps({"nftables": commands}))

    def _run(self, args: list[str], stdin: str | None, missing_ok: bool = False) -> str | None:
        """nft's output; None when ``missing_ok`` and nft said what ``args`` name does not
        exist (its messages in the C locale, so that this can be told)."""
        argv = [self._binary(), *args]

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=NFT_TIMEOUT,
                check=False,
                env={**os.environ, "LC_ALL": "C"},
            )

        try:
            proc = run_in(self.netns, run)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetworkError(f"cannot run {' '.join(argv)}: {exc}") from exc
        if proc.returncode != 0 and missing_ok and _MISSING in proc.stderr:
            return None
        if proc.returncode != 0:
            where = f" in network namespace {self.netns}" if self.netns else ""
            raise NetworkError(
                f"nft {' '.join(args)}{where} failed (exit {proc.returncode}) on tables "
                f"{' and '.join(f'{f} {self.table}' for f in FAMILIES)}: "
                f"{proc.stderr.strip()[:2000]}"
            )
        return proc.stdout

    def _binary(self) -> str:
        if self._nft is None:
            found = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")
            if found is None:
                raise NetworkError(
                    "nft not found in PATH or /usr/sbin: install nftables for port forwarding"
                )
            self._nft = found
        return self._nft
