"""Ceph storage pools (nomad-driver-virt's `storage_pools { ceph "x" { pool, hosts,
authentication { username, secret } } }`): RBD images in a Ceph pool, managed through the
Ceph bindings (``ceph_bindings``), opened by QEMU's own rbd driver.

* Connections never read a ceph.conf (the pool block says everything) and are bounded:
  ``CONNECT_TIMEOUT`` for the monitors, ``OP_TIMEOUT`` per operation, so a wrong secret or an
  unreachable monitor fails the start in seconds, naming the pool and the field. librados
  logs nothing to the plugin's stderr (it would land in the agent's log).
* Before connecting, each monitor is tried with a plain TCP connect: no monitor answering is
  reported as such (``hosts``); monitors that answer but a session that does not come up is
  reported against ``authentication`` (cephx refuses a wrong key by not letting the session
  finish, which librados reports as a time-out).
* The secret lives in memory only (``repr=False``); it reaches librados as a config value
  and QEMU through a sealed memfd (``vm.qemu.rbd_keys``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nomad_vm.errors import ConfigError, HypervisorError
from nomad_vm.storage.ceph_bindings import CephUnavailable, load

CONNECT_TIMEOUT = 10  # seconds for the monitors to accept our session
OP_TIMEOUT = 60  # seconds for one monitor or OSD operation
PROBE_TIMEOUT = 3.0  # seconds for a TCP connect to one monitor
# A cephx key: 2 bytes of type, 8 of creation time, 2 of length, 16 of secret.
CEPHX_KEY_BYTES = 28


@dataclass(frozen=True)
class Monitor:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class CephPool:
    """One configured Ceph pool: ``label`` is its name in `storage_pools`."""

    label: str
    pool: str
    monitors: tuple[Monitor, ...]
    username: str
    secret: str = field(repr=False)

    @property
    def field(self) -> str:
        return f"config.storage_pools.ceph.{self.label}"

    @property
    def mon_host(self) -> str:
        return ",".join(str(m) for m in self.monitors)


def parse_ceph_pool(label: str, body: Mapping[str, object]) -> CephPool:
    """The pool block, checked: ConfigError naming the field for a missing or malformed
    value (a secret that is not a base64 cephx key is refused here, not at the first task)."""
    where = f"config.storage_pools.ceph.{label}"
    pool = str(body.get("pool") or "")
    if not pool:
        raise ConfigError(f"{where}.pool", "must name the Ceph pool")
    hosts = body.get("hosts")
    hosts = list(hosts) if isinstance(hosts, list | tuple) else []
    if not hosts:
        raise ConfigError(f"{where}.hosts", "must list the Ceph monitors")
    monitors = tuple(_monitor(f"{where}.hosts[{i}]", str(h)) for i, h in enumerate(hosts))
    auth = body.get("authentication")
    auth = auth if isinstance(auth, Mapping) else {}
    username = str(auth.get("username") or "").removeprefix("client.")
    if not username:
        raise ConfigError(f"{where}.authentication.username", "must name the Ceph client")
    secret = str(auth.get("secret") or "").strip()
    try:
        key = base64.b64decode(secret, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != CEPHX_KEY_BYTES:
        # The value itself is never repeated: it is a credential.
        raise ConfigError(
            f"{where}.authentication.secret",
            "is not a cephx key (the base64 `key` of `ceph auth get-key client.<name>`)",
        )
    return CephPool(label, pool, monitors, username, secret)


def _monitor(field: str, value: str) -> Monitor:
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            field, f"{value!r}: give a monitor as host:port (3300 for msgr2, 6789 for v1)"
        )
    return Monitor(host, int(port))


class CephError(HypervisorError):
    """A Ceph pool could not be used; the message names the pool and the field."""


def _rados_conf(pool: CephPool) -> dict[str, str]:
    return {
        "mon_host": pool.mon_host,
        "key": pool.secret,
        "client_mount_timeout": str(CONNECT_TIMEOUT),
        "rados_mon_op_timeout": str(OP_TIMEOUT),
        "rados_osd_op_timeout": str(OP_TIMEOUT),
        "log_to_stderr": "false",
        "err_to_stderr": "false",
        "log_file": "",
        "admin_socket": "",
    }


def reachable_monitors(monitors: Sequence[Monitor]) -> tuple[list[Monitor], list[str]]:
    """The monitors a TCP connect reaches, and why the others are not."""
    up, down = [], []
    for mon in monitors:
        try:
            with socket.create_connection((mon.host, mon.port), timeout=PROBE_TIMEOUT):
                up.append(mon)
        except OSError as exc:
            down.append(f"{mon}: {exc.strerror or exc}")
    return up, down


@contextlib.contextmanager
def connect(pool: CephPool) -> Iterator[tuple[Any, Any, Any]]:
    """``(rados, rbd module, ioctx)`` of the pool, closed on exit; CephError naming the pool
    and the field when the bindings, the monitors, the credentials or the pool fail."""
    try:
        rados_mod, rbd_mod = load()
    except CephUnavailable as exc:
        raise CephError(f"Ceph pool {pool.label!r} ({pool.field}): {exc}") from None
    up, down = reachable_monitors(pool.monitors)
    if not up:
        raise CephError(
            f"Ceph pool {pool.label!r} ({pool.field}.hosts): no monitor is reachable "
            f"({'; '.join(down)})"
        )
    cluster = rados_mod.Rados(rados_id=pool.username, conf=_rados_conf(pool))
    try:
        try:
            cluster.connect(timeout=CONNECT_TIMEOUT)
        except rados_mod.Error as exc:
            raise CephError(
                f"Ceph pool {pool.label!r} ({pool.field}.authentication): the monitors at "
                f"{', '.join(str(m) for m in up)} did not accept client.{pool.username} within "
                f"{CONNECT_TIMEOUT}s ({_why(exc)}): check username and secret"
            ) from None
        try:
            ioctx = cluster.open_ioctx(pool.pool)
        except rados_mod.Error as exc:
            raise CephError(
                f"Ceph pool {pool.label!r} ({pool.field}.pool): cannot open pool "
                f"{pool.pool!r} as client.{pool.username}: {_why(exc)}"
            ) from None
        try:
            yield cluster, rbd_mod, ioctx
        finally:
            ioctx.close()
    finally:
        cluster.shutdown()


def _why(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return f"{errno.errorcode.get(code, code)}: {exc}"
    return str(exc)


def pools_by_label(pools: Sequence[CephPool]) -> dict[str, CephPool]:
    return {p.label: p for p in pools}
