"""A real single-node Ceph cluster for the RBD pool tests: one monitor on a free loopback port
(msgr v2 and v1), one OSD on memstore, no manager (the monitor alone creates pools and users,
and the OSD serves I/O without one). Everything lives in one temporary directory with its own
cluster config (never /etc/ceph, never systemd); the daemons run in the foreground as our
children, so they are killed by pid and waited for at the end, and the directory is removed.

Readiness is polled with a deadline on what the tests need (the monitor answering, the OSD
up and in, the pool's placement groups active), never slept for.

With ``netns`` every daemon and every admin command runs in that network namespace (``ip
netns exec``), so the monitor can listen on an address the test gave the namespace (seed 002's
`10.0.0.2:3300`) without that address ever existing in the host's own namespace.

``python -m tests.ceph_cluster`` starts one, prints how long that took, and removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

POOL = "nomad-rbd"
USER = "nomad"
MEMSTORE_BYTES = 4 * 1024**3  # room for the Debian guest (about 1 GB of data) and its copies


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CephCluster:
    """What the tests get: monitors as ``host:port``, the RBD pool, the pool's user and its
    base64 cephx key (caps limited to the pool), and ``admin`` for the tests' own checks."""

    root: Path
    monitors: list[str]
    pool: str
    username: str
    secret: str
    conf: Path
    start_seconds: float = 0.0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    netns: str | None = None

    @property
    def admin(self) -> CephAdmin:
        return CephAdmin(self.conf, self.netns)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class CephAdmin:
    """The admin's view, through Ceph's own CLIs with our cluster's config (JSON output)."""

    conf: Path
    netns: str | None = None

    def run(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            in_netns(
                self.netns,
                [*args[:1], "-c", str(self.conf), "--connect-timeout", "15", *args[1:]]
                if args[0] == "ceph"
                else [*args[:1], "-c", str(self.conf), *args[1:]],
            ),
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return out.stdout

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args, "--format", "json") or "null")

    def images(self, pool: str = POOL) -> list[str]:
        listed = self.json("rbd", "ls", "-p", pool)
        return sorted(str(x) for x in listed) if isinstance(listed, list) else []

    def snapshots(self, image: str, pool: str = POOL) -> list[dict[str, object]]:
        listed = self.json("rbd", "snap", "ls", f"{pool}/{image}")
        return listed if isinstance(listed, list) else []

    def info(self, image: str, pool: str = POOL) -> dict[str, object]:
        got = self.json("rbd", "info", f"{pool}/{image}")
        assert isinstance(got, dict)
        return got

    def remove_everything(self, pool: str = POOL) -> None:
        """Between tests' own volumes only (never a check for the driver's leftovers)."""
        for image in self.images(pool):
            for snap in self.snapshots(image, pool):
                name = f"{pool}/{image}@{snap['name']}"
                subprocess.run(in_netns(self.netns, ["rbd", "-c", str(self.conf), "snap",
                               "unprotect", name]), capture_output=True, timeout=60)  # fmt: skip
            self.run("rbd", "snap", "purge", f"{pool}/{image}")
            self.run("rbd", "rm", "--no-progress", f"{pool}/{image}")


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    """``argv`` run in ``netns`` (``ip netns exec`` execs it: the pid stays the command's)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def _wait(what: str, predicate: object, timeout: float, every: float = 0.2) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ceph test cluster: {what} not within {timeout:.0f}s")
        time.sleep(every)


def start_cluster(
    parent: Path | None = None,
    *,
    netns: str | None = None,
    mon_ip: str = "127.0.0.1",
    ports: tuple[int, int] | None = None,
    pool: str = POOL,
    user_key: str | None = None,
) -> CephCluster:
    """The cluster: its monitor on ``mon_ip`` at ``ports`` (msgr2, v1; free loopback ports
    by default), the RBD pool ``pool``, and client.nomad with ``user_key`` (a base64 cephx
    key; a new one by default)."""
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="ceph-", dir=parent))
    v2, v1 = ports or (_free_port(), _free_port())
    fsid = str(uuid.uuid4())
    conf = root / "ceph.conf"
    for sub in ("mon", "osd", "run", "log"):
        (root / sub).mkdir()
    conf.write_text(
        f"""[global]
fsid = {fsid}
mon host = [v2:{mon_ip}:{v2},v1:{mon_ip}:{v1}]
public addr = {mon_ip}
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {root}/admin.keyring
run dir = {root}/run
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
mon data = {root}/mon/$name
osd data = {root}/osd/$name
osd objectstore = memstore
memstore device bytes = {MEMSTORE_BYTES}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
auth allow insecure global id reclaim = false
osd memory target = 536870912
osd op num shards = 1
osd op num threads per shard = 1
"""
    )
    cluster = CephCluster(root, [f"{mon_ip}:{v2}"], pool, USER, "", conf, netns=netns)
    try:
        _bootstrap(cluster, fsid, mon_ip, (v2, v1), user_key)
    except BaseException:
        cluster.stop()
        raise
    cluster.start_seconds = time.monotonic() - started
    return cluster


def _run_in(netns: str | None, *argv: str, timeout: float = 60) -> str:
    out = subprocess.run(in_netns(netns, list(argv)), capture_output=True, text=True,
                         timeout=timeout)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {out.returncode}: {out.stderr[-2000:]}")
    return out.stdout


def _bootstrap(
    cluster: CephCluster, fsid: str, mon_ip: str, ports: tuple[int, int], user_key: str | None
) -> None:
    root, conf, pool = cluster.root, str(cluster.conf), cluster.pool
    v2, v1 = ports

    def _run(*argv: str, timeout: float = 60) -> str:
        return _run_in(cluster.netns, *argv, timeout=timeout)

    mon_keyring = root / "mon.keyring"
    admin_keyring = root / "admin.keyring"
    _run("ceph-authtool", "--create-keyring", str(mon_keyring), "--gen-key", "-n", "mon.",
         "--cap", "mon", "allow *")  # fmt: skip
    _run("ceph-authtool", "--create-keyring", str(admin_keyring), "--gen-key", "-n",
         "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
         "--cap", "mgr", "allow *")  # fmt: skip
    _run("ceph-authtool", str(mon_keyring), "--import-keyring", str(admin_keyring))
    monmap = root / "monmap"
    _run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
         f"[v2:{mon_ip}:{v2},v1:{mon_ip}:{v1}]", str(monmap))  # fmt: skip
    _run("ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", str(monmap),
         "--keyring", str(mon_keyring))  # fmt: skip
    cluster.procs.append(_daemon(cluster, "ceph-mon", "-c", conf, "-f", "-i", "a"))
    admin = cluster.admin

    def answers() -> bool:
        _alive(cluster)
        try:
            admin.run("ceph", "mon", "stat", timeout=20)
        except subprocess.SubprocessError:
            return False
        return True

    _wait("the monitor answering", answers, 60)
    osd_uuid = str(uuid.uuid4())
    osd_id = admin.run("ceph", "osd", "new", osd_uuid).strip()
    osd_dir = root / "osd" / f"osd.{osd_id}"
    osd_dir.mkdir()
    _run("ceph-authtool", "--create-keyring", str(osd_dir / "keyring"), "--gen-key", "-n",
         f"osd.{osd_id}")  # fmt: skip
    admin.run("ceph", "auth", "add", f"osd.{osd_id}", "osd", "allow *", "mon",
              "allow profile osd", "-i", str(osd_dir / "keyring"))  # fmt: skip
    _run("ceph-osd", "-c", conf, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid,
         "--keyring", str(osd_dir / "keyring"), timeout=120)  # fmt: skip
    keyring = str(osd_dir / "keyring")
    cluster.procs.append(
        _daemon(cluster, "ceph-osd", "-c", conf, "-f", "-i", osd_id, "--keyring", keyring)
    )

    def osd_up() -> bool:
        _alive(cluster)
        stat = admin.json("ceph", "osd", "stat")
        return isinstance(stat, dict) and stat.get("num_up_osds") == 1

    _wait("the OSD up", osd_up, 120)
    admin.run("ceph", "osd", "pool", "create", pool, "8", "8")
    admin.run("ceph", "osd", "pool", "application", "enable", pool, "rbd")

    # Without a manager nothing reports placement-group states, but the first write waits
    # for them: `rbd pool init` writes the pool's first object, so it returns once the pool
    # serves I/O (bounded by its timeout).
    admin.run("rbd", "pool", "init", pool, timeout=180)
    caps = ("mon", "profile rbd", "osd", f"profile rbd pool={pool}")
    if user_key is None:
        key = admin.run("ceph", "auth", "get-or-create-key", f"client.{USER}", *caps)
        cluster.secret = key.strip()
        return
    user_keyring = root / "user.keyring"
    _run("ceph-authtool", "--create-keyring", str(user_keyring), "-n", f"client.{USER}",
         "--add-key", user_key)  # fmt: skip
    admin.run("ceph", "auth", "add", f"client.{USER}", *caps, "-i", str(user_keyring))
    user_keyring.unlink()
    cluster.secret = user_key


def _daemon(cluster: CephCluster, *argv: str) -> subprocess.Popen[bytes]:
    log = open(cluster.root / "log" / f"{argv[0]}.out", "ab")  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(
            in_netns(cluster.netns, list(argv)), stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
    finally:
        log.close()


def _alive(cluster: CephCluster) -> None:
    for proc in cluster.procs:
        if proc.poll() is not None:
            logs = "\n".join(
                p.read_text(errors="replace")[-2000:] for p in (cluster.root / "log").iterdir()
            )
            command = " ".join(str(a) for a in proc.args)
            raise RuntimeError(f"{command} exited with {proc.returncode}:\n{logs}")


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    cluster = start_cluster()
    print(f"\nCeph test cluster started in {cluster.start_seconds:.1f}s")
    try:
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":
    c = start_cluster()
    try:
        print(f"started in {c.start_seconds:.1f}s: {c.monitors} pool {c.pool} user {c.username}")
        print(c.admin.run("ceph", "status"))
    finally:
        c.stop()
        print("stopped; removed", c.root, os.path.exists(c.root))
