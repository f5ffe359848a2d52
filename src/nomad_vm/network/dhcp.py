"""DHCP for guests without cloud-init: one dnsmasq per bridge, answering only our tasks' MACs.

The driver still chooses every address itself (``static_ip`` or the pool) before the VM boots,
so StartTask can tell Nomad; dnsmasq only hands each guest the address chosen for its MAC
(``--dhcp-host``; the range is ``static``, so an unknown MAC gets no address at all), with the
router and name servers the task asked for.

The host list is passed as arguments, and dnsmasq is restarted on every change instead of
reloaded with SIGHUP: after starting, dnsmasq drops root for an unprivileged user, which could
not re-read host files in the plugin's private data_dir. The restart also prunes the lease file
of MACs that are gone while dnsmasq is stopped; a lease left for a removed task's MAC would make
dnsmasq refuse that address to the next task given it ("leased to another client"). Leases of
the remaining guests survive in the file; a request in the few milliseconds without a server is
retried by the client.

dnsmasq is left to daemonize: the exit status of the command reports startup failures (port 67
taken by another DHCP server, a bridge without an address in the subnet is only logged), and
the daemon is reparented to init, so it outlives a plugin restart as QEMU does. Its identity
(pid and start time) is kept so a recycled pid is never signalled.

State, per server, in ``<state_dir>/dhcp/<key>/``: ``hosts.json`` (owner -> host, the source
of truth), ``server.json`` (the daemon's identity), ``leases``, ``dnsmasq.pid``,
``dnsmasq.log``. Changes hold ``<key>.lock``. The directory and the lock go with the last host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from nomad_vm.errors import NetworkError
from nomad_vm.files import exclusive_lock, write_atomically
from nomad_vm.processes import (
    ProcessIdentity,
    identity_from_legacy,
    identity_of,
    is_same_process,
)

log = logging.getLogger(__name__)

DNSMASQ = "dnsmasq"
# Renewal at half of it: every 6 h a guest sends a request; addresses never change anyway.
LEASE_TIME = "12h"
STOP_GRACE_SECONDS = 5.0
START_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class DhcpHost:
    """What one guest is told: its address for its MAC, hostname, default route and DNS."""

    mac: str
    address: IPv4Address
    hostname: str
    router: IPv4Address
    dns: tuple[IPv4Address, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw.update(address=str(self.address), router=str(self.router))
        raw["dns"] = [str(d) for d in self.dns]
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DhcpHost:
        return cls(
            mac=str(raw["mac"]),
            address=IPv4Address(raw["address"]),
            hostname=str(raw["hostname"]),
            router=IPv4Address(raw["router"]),
            dns=tuple(IPv4Address(d) for d in raw.get("dns", ())),
        )


def server_key(bridge: str, netns: str | None) -> str:
    """The state directory's name: the bridge, or (group mode, where every allocation's bridge
    has the same name) a hash of the allocation's namespace path."""
    if not netns:
        return bridge
    return "group-" + hashlib.sha256(netns.encode()).hexdigest()[:24]


class DhcpServer:
    """The dnsmasq serving ``bridge`` (inside the network namespace ``netns`` if given).
    ``subnet`` and ``binary`` may be None for a server that is only being wound down (DHCP or
    the bridge gone from the plugin config since its hosts were added): it can stop dnsmasq but
    not start it."""

    def __init__(
        self,
        state_dir: Path,
        bridge: str,
        subnet: IPv4Network | None,
        binary: Path | None,
        netns: str | None = None,
    ) -> None:
        key = server_key(bridge, netns)
        self.directory = state_dir / "dhcp" / key
        self.lock_path = state_dir / "dhcp" / f"{key}.lock"
        self.bridge = bridge
        self.subnet = subnet
        self.binary = binary
        self.netns = netns

    def add(self, owner: str, host: DhcpHost) -> None:
        """Serve ``host`` too. On failure the server is left as it was: without this host,
        serving the others."""
        with self._locked():
            before = self._hosts()
            hosts = {**before, owner: host}
            self._save_hosts(hosts)
            try:
                self._restart(hosts)
            except BaseException:
                self._save_hosts(before)
                if before:
                    with contextlib.suppress(NetworkError):
                        self._restart(before)
                raise

    def remove(self, owner: str) -> None:
        """Forget ``owner``'s host (idempotent); the last one stops dnsmasq and removes the
        server's files."""
        if not self.directory.exists():
            return
        with self._locked():
            hosts = self._hosts()
            if hosts.pop(owner, None) is None and hosts:
                return
            self._save_hosts(hosts)
            if hosts and self.can_start:
                self._restart(hosts)
                return
            self._stop()
            if hosts:
                log.warning("DHCP is off in the plugin config: %s stopped with hosts left", self)
                return
            shutil.rmtree(self.directory, ignore_errors=True)
            # Still holding the lock: a waiter on this inode notices and reopens the path.
            self.lock_path.unlink(missing_ok=True)

    def ensure_running(self) -> bool:
        """Start dnsmasq again if it died (after a host reboot or a kill) while hosts remain;
        True if it had to be started."""
        if not self.directory.exists() or not self.can_start:
            return False
        with self._locked():
            hosts = self._hosts()
            if not hosts or self.running() is not None:
                return False
            self._restart(hosts)
            return True

    @property
    def can_start(self) -> bool:
        return self.binary is not None and self.subnet is not None

    def running(self) -> ProcessIdentity | None:
        """The daemon's identity if it still runs."""
        try:
            raw = json.loads((self.directory / "server.json").read_text(encoding="utf-8"))
            if "start_time" in raw:  # written by an older plugin: a wall-clock start time
                legacy = identity_from_legacy(int(raw["pid"]), float(raw["start_time"]))
                return legacy if legacy is not None and is_same_process(legacy) else None
            ident = ProcessIdentity.from_dict(raw)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return ident if is_same_process(ident) else None

    def leases(self) -> dict[str, IPv4Address]:
        """MAC -> address of the leases dnsmasq has granted (its lease file)."""
        found = {}
        for line in self._lease_lines():
            with contextlib.suppress(IndexError, ValueError):
                found[_lease_mac(line)] = IPv4Address(line.split()[2])
        return found

    def __str__(self) -> str:
        where = f" in {self.netns}" if self.netns else ""
        return f"the DHCP server of {self.bridge}{where}"

    # -- in the lock ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            with exclusive_lock(self.lock_path):
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                yield
        except OSError as exc:
            raise NetworkError(f"{self}: {exc}") from exc

    def _hosts(self) -> dict[str, DhcpHost]:
        path = self.directory / "hosts.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return {owner: DhcpHost.from_dict(h) for owner, h in raw.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NetworkError(f"{path} is corrupt ({exc}); remove it to start over") from exc

    def _save_hosts(self, hosts: Mapping[str, DhcpHost]) -> None:
        data = {owner: h.to_dict() for owner, h in sorted(hosts.items())}
        write_atomically(self.directory / "hosts.json", json.dumps(data, indent=1).encode())

    def _restart(self, hosts: Mapping[str, DhcpHost]) -> None:
        if self.binary is None or self.subnet is None:
            raise NetworkError(f"{self} cannot be started: DHCP is off in the plugin config")
        self._stop()
        self._prune_leases({h.mac for h in hosts.values()})
        argv = dnsmasq_argv(self.binary, self.directory, self.bridge, self.subnet, hosts)
        if self.netns:
            argv = ["nsenter", f"--net={self.netns}", "--", *argv]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=START_TIMEOUT_SECONDS, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetworkError(f"cannot start dnsmasq for {self}: {exc}") from exc
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
            raise NetworkError(f"dnsmasq for {self} did not start: {why}")
        ident = self._daemon_identity()
        write_atomically(
            self.directory / "server.json",
            json.dumps(ident.to_dict()).encode(),
        )

    def _daemon_identity(self) -> ProcessIdentity:
        pid_file = self.directory / "dnsmasq.pid"
        try:
            ident = identity_of(int(pid_file.read_text().strip()))
        except (OSError, ValueError) as exc:
            raise NetworkError(f"dnsmasq for {self} left no usable {pid_file}: {exc}") from exc
        if ident is None:
            raise NetworkError(f"dnsmasq for {self} exited right after starting: see its log "
                               f"{self.directory / 'dnsmasq.log'}")  # fmt: skip
        return ident

    def _stop(self) -> None:
        ident = self.running()
        if ident is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(ident.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not is_same_process(ident):
                    return
                time.sleep(0.02)
        raise NetworkError(f"dnsmasq (pid {ident.pid}) for {self} does not exit")

    def _lease_lines(self) -> list[str]:
        try:
            return (self.directory / "leases").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []

    def _prune_leases(self, macs: set[str]) -> None:
        """Drop the leases of MACs no longer served (dnsmasq is stopped while this runs)."""
        lines = self._lease_lines()
        kept = [line for line in lines if _lease_mac(line) in macs]
        if kept != lines:
            write_atomically(self.directory / "leases", "".join(f"{k}\n" for k in kept).encode())


def _lease_mac(line: str) -> str:
    """The MAC of a dnsmasq lease line, ``<expiry> <mac> <address> <name> <client id>``."""
    fields = line.split()
    return fields[1].lower() if len(fields) > 1 else ""


def dnsmasq_argv(
    binary: Path,
    directory: Path,
    bridge: str,
    subnet: IPv4Network,
    hosts: Mapping[str, DhcpHost],
) -> list[str]:
    """dnsmasq as a DHCP server only, on one bridge, for exactly ``hosts``."""
    argv = [
        str(binary),
        "--conf-file=/dev/null",  # nothing from /etc/dnsmasq.conf or /etc/dnsmasq.d
        "--port=0",  # no DNS server
        # Only this bridge, with the DHCP socket bound to it (SO_BINDTODEVICE): dnsmasqs of
        # other bridges (ours, libvirt's) can run beside it.
        f"--interface={bridge}",
        "--bind-interfaces",
        f"--dhcp-range={subnet.network_address},static,{subnet.netmask},{LEASE_TIME}",
        "--dhcp-authoritative",  # answer at once, NAK stale leases from an earlier guest
        f"--dhcp-leasefile={directory / 'leases'}",
        f"--pid-file={directory / 'dnsmasq.pid'}",
        f"--log-facility={directory / 'dnsmasq.log'}",
    ]
    for owner, host in sorted(hosts.items()):
        tag = "h" + hashlib.sha256(owner.encode()).hexdigest()[:12]
        name = f",{host.hostname}" if host.hostname else ""
        argv.append(f"--dhcp-host={host.mac},set:{tag},{host.address}{name}")
        argv.append(f"--dhcp-option=tag:{tag},option:router,{host.router}")
        if host.dns:
            servers = ",".join(str(d) for d in host.dns)
            argv.append(f"--dhcp-option=tag:{tag},option:dns-server,{servers}")
    return argv
