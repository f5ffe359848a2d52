"""Throwaway network namespaces for tests that need real bridges, TAPs and nftables rules.

Everything a test does to the network happens in namespaces named ``nvt-<random>`` (``nve-``
for the e2e tests' agents) that
``isolated_namespaces`` creates and always deletes (killing whatever still runs in them, and
failing the test if anything did). At the end it checks that nothing of ours appeared in the
host's own namespace: no link whose name starts with one of the given prefixes, no new nftables
table of the plugin's, and an unchanged ``ip_forward``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from pyroute2 import IPRoute

from nomad_vm.network.netns import NETNS_DIR
from nomad_vm.network.nft import DEFAULT_TABLE

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

HTTP_GET = r"""
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as reply:
        print(reply.read().decode().strip())
except Exception as exc:
    print(f"error {type(exc).__name__}: {exc}")
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def host_links() -> set[str]:
    with IPRoute() as ipr:
        return {str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}


def host_tables() -> set[str]:
    out = subprocess.run(
        ["nft", "-j", "list", "tables"], capture_output=True, text=True, check=True, timeout=30
    )
    items = json.loads(out.stdout)["nftables"]
    return {f"{i['table']['family']} {i['table']['name']}" for i in items if "table" in i}


def pids_in(name: str) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30, check=False
    )
    return [int(pid) for pid in out.stdout.split()]


class Namespaces:
    """Creates namespaces ``<prefix>-<random>`` (loopback up) and helper processes in them;
    ``cleanup`` deletes them and whatever still runs there."""

    def __init__(self, prefix: str = "nvt") -> None:
        self.prefix = prefix
        self.names: list[str] = []
        self.procs: list[subprocess.Popen[str]] = []

    def new(self) -> str:
        name = f"{self.prefix}-{secrets.token_hex(4)}"
        ip("netns", "add", name)
        self.names.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def spawn(self, ns: str, script: str, *args: str) -> subprocess.Popen[str]:
        """A python process in ``ns`` (a stand-in server), returned once it printed "ready";
        ended by ``cleanup`` (expected, so not counted as a leftover)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        return proc

    def cleanup(self) -> dict[str, list[int]]:
        """Delete every namespace; returns the processes that were still running in them
        (killed first, by pid: a namespace lives on as long as a process is inside it)."""
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)
        leftovers: dict[str, list[int]] = {}
        for name in self.names:
            pids = pids_in(name)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if pids:
                leftovers[name] = pids
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        return leftovers


@contextlib.contextmanager
def isolated_namespaces(
    link_prefixes: tuple[str, ...], prefix: str = "nvt"
) -> Iterator[Namespaces]:
    """Namespaces for one test; afterwards, check the host's own namespace is untouched and
    no process outlived the test inside them."""
    assert os.geteuid() == 0, "these tests create network namespaces: run them as root"
    tables_before = host_tables()
    forward_before = IP_FORWARD.read_text()
    spaces = Namespaces(prefix)
    try:
        yield spaces
    finally:
        leftovers = spaces.cleanup()
    left = [n for n in spaces.names if (NETNS_DIR / n).exists()]
    assert not left, f"namespaces not deleted: {left}"
    assert not leftovers, f"processes outlived the test in its namespaces: {leftovers}"
    leaked_links = sorted(n for n in host_links() if n.startswith(link_prefixes))
    assert not leaked_links, f"links in the host's own namespace: {leaked_links}"
    leaked_tables = sorted(t for t in host_tables() - tables_before if DEFAULT_TABLE in t)
    assert not leaked_tables, f"nftables tables in the host's own namespace: {leaked_tables}"
    assert IP_FORWARD.read_text() == forward_before, "the host's ip_forward changed"


def veth(ns_a: str, name_a: str, addr_a: str, ns_b: str, name_b: str, addr_b: str) -> None:
    """A veth pair between two namespaces, both ends up with the given ``a.b.c.d/len``."""
    ip("-n", ns_a, "link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b)
    for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
        ip("-n", ns, "addr", "add", addr, "dev", name)
        ip("-n", ns, "link", "set", name, "up")


def http_get(ns: str, url: str, timeout: float = 10.0) -> str:
    """The body a client in ``ns`` gets from ``url`` (stripped), or ``error <exception>``."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", HTTP_GET, url, str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 20,
        check=True,
    )
    return out.stdout.strip()
