"""A Debian cloud guest as a task through the real plugin: thin copy of the image, the guest's own
kernel with root on the disk, a cloud-init seed, the guest agent, and a graceful ACPI stop.

Slow (a Debian boot under TCG is about a minute): one VM for the whole module.
"""

from __future__ import annotations

import hashlib
import stat
import time
from pathlib import Path

import pytest
from google.protobuf import duration_pb2

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import vm_processes_under
from tests.integration.pluginkit import FifoReader, configure, debian_boot, drv, task_config
from tests.integration.test_vm_lifecycle import collect_events, destroy, stop, wait, wait_until

MARKER = "nomad-vm-cmds-ran"
SSH_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHnomadvmtestkeynotarealkeyatall0000000 test@nomad-vm"
)
APP = (
    'setsid sh -c \'trap "echo got-sighup > /dev/ttyS0" HUP; '
    "while :; do sleep 1; done' >/dev/null 2>&1 & echo $! > /run/app.pid"
)
USER_DATA = """#cloud-config
write_files:
  - path: /etc/from-user-data
    content: merged
runcmd:
  - echo user-runcmd > /run/user-runcmd
"""


def exec_stream(
    plugin: PluginProcess, task_id: str, command: list[str], stdin: bytes, tty: bool = False
) -> tuple[bytes, bytes, int]:
    """Drive ExecTaskStreaming the way `nomad alloc exec` does: setup (with the window size
    when there is a terminal), stdin, close."""
    setup = driver_pb2.ExecTaskStreamingRequest(
        setup=driver_pb2.ExecTaskStreamingRequest.Setup(task_id=task_id, command=command, tty=tty)
    )
    if tty:
        setup.tty_size.height, setup.tty_size.width = 30, 100
    data = driver_pb2.ExecTaskStreamingRequest(
        stdin=driver_pb2.ExecTaskStreamingIOOperation(data=stdin)
    )
    close = driver_pb2.ExecTaskStreamingRequest(
        stdin=driver_pb2.ExecTaskStreamingIOOperation(close=True)
    )
    out, err, code = b"", b"", -1
    for frame in drv(plugin).ExecTaskStreaming(iter([setup, data, close]), timeout=60):
        out += frame.stdout.data
        err += frame.stderr.data
        if frame.exited:
            code = frame.result.exit_code
    return out, err, code


def run(plugin: PluginProcess, task_id: str, script: str) -> tuple[bytes, int]:
    reply = drv(plugin).ExecTask(
        driver_pb2.ExecTaskRequest(task_id=task_id, command=["/bin/sh", "-c", script]),
        timeout=60,
    )
    return reply.stdout + reply.stderr, reply.result.exit_code


def check_shares(plugin: PluginProcess, task_id: str, transport: str) -> None:
    """local/ is readable and read-only in the guest, even for a guest that remounts it
    read-write (the host side refuses); a writable host volume is writable."""
    assert run(plugin, task_id, "cat /local/hello.txt") == (b"written by a Nomad template\n", 0)
    assert run(plugin, task_id, "findmnt -n -o FSTYPE /local") == (f"{transport}\n".encode(), 0)
    out, code = run(plugin, task_id, "touch /local/nope")
    assert code != 0 and b"Read-only file system" in out, out
    out, code = run(plugin, task_id, "mount -o remount,rw /local; touch /local/nope")
    assert code != 0 and b"nope" in out, out
    out, code = run(plugin, task_id, "touch /alloc/nope")
    assert code != 0, out
    assert run(plugin, task_id, "echo hi > /srv/vol/from-guest") == (b"", 0)


# Guest root tries to plant a setuid-root program and a device node on a writable share.
PLANT = (
    "cd /srv/vol && cp /bin/sh suid-sh; chown 0:0 suid-sh; chmod 4755 suid-sh; "
    "mknod mem c 1 1; mknod disk b 8 0; ls -ln suid-sh"
)


def check_nothing_privileged_planted(plugin: PluginProcess, task_id: str, volume: Path) -> None:
    """The share is served as vm_user: whatever guest root does, the host sees no setuid-root
    file and no device node there."""
    out, _ = run(plugin, task_id, PLANT)
    planted = volume / "suid-sh"
    assert planted.exists(), out  # the attempt happened: the copy is there
    st = planted.stat()
    assert not (st.st_uid == 0 and st.st_mode & stat.S_ISUID), (oct(st.st_mode), st.st_uid, out)
    assert st.st_uid != 0, (st.st_uid, out)
    for name in ("mem", "disk"):
        node = volume / name
        assert not (node.exists() and (node.is_char_device() or node.is_block_device())), out


def check_cloud_init(plugin: PluginProcess, task_id: str) -> None:
    """What the seed asked for is in the guest (read back through the agent)."""
    assert run(plugin, task_id, "hostname") == (b"web-1\n", 0)
    assert run(plugin, task_id, "readlink /etc/localtime") == (
        b"/usr/share/zoneinfo/Europe/Berlin\n",
        0,
    )
    keys, _ = run(plugin, task_id, "cat /home/nomad/.ssh/authorized_keys")
    assert SSH_KEY.encode() in keys
    verify = (
        'python3 -c \'import crypt; h=[l.split(":")[1] for l in open("/etc/shadow") '
        'if l.startswith("nomad:")][0]; print(crypt.crypt("s3cret-pass", h) == h)\''
    )
    assert run(plugin, task_id, verify)[0].startswith(b"True\n")  # (+ a DeprecationWarning)
    # The user's document was merged: its write_files and runcmd ran next to ours.
    assert run(plugin, task_id, "cat /etc/from-user-data /run/user-runcmd") == (
        b"mergeduser-runcmd\n",  # the write_files content has no trailing newline
        0,
    )
    # The task environment is visible to the default user's login shell.
    assert run(plugin, task_id, "su - nomad -c 'echo $NOMAD_TASK_NAME'") == (b"web\n", 0)


def check_exec(plugin: PluginProcess, task_id: str) -> None:
    """Script-check style ExecTask, streaming exec with stdin, and the refused tty mode."""
    reply = drv(plugin).ExecTask(
        driver_pb2.ExecTaskRequest(
            task_id=task_id,
            command=["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
            timeout=duration_pb2.Duration(seconds=30),
        ),
        timeout=60,
    )
    assert (reply.stdout, reply.stderr, reply.result.exit_code) == (b"out\n", b"err\n", 3)
    out, err, code = exec_stream(
        plugin, task_id, ["/bin/sh", "-c", "cat; echo $NOMAD_TASK_NAME"], b"from stdin\n"
    )
    assert (out, err, code) == (b"from stdin\nweb\n", b"", 0)
    check_terminal(plugin, task_id)


def check_terminal(plugin: PluginProcess, task_id: str) -> None:
    """`nomad alloc exec -t`: the command runs on a pty of the given size, reads typed input,
    and its exit code comes back; the hot-plugged port is gone afterwards."""
    script = 'tty; stty size; read line; echo "got $line"; exit 5'
    out, err, code = exec_stream(plugin, task_id, ["/bin/sh", "-c", script], b"hello\r", tty=True)
    lines = out.decode().split("\r\n")
    # The terminal echoes the typed line, possibly before the command printed anything.
    assert any(line.startswith("/dev/pts/") for line in lines) and "30 100" in lines, out
    assert "got hello" in lines and code == 5 and err == b"", (out, err, code)
    out, _, code = exec_stream(plugin, task_id, ["no-such-program"], b"", tty=True)
    assert code == 127 and b"no-such-program" in out, out
    ports, _ = run(plugin, task_id, "cat /sys/class/virtio-ports/*/name")
    assert ports == b"org.qemu.guest_agent.0\n", ports


@pytest.mark.parametrize("transport", ["virtiofs", "9p"])
def test_debian_guest_with_cloud_init_agent_and_acpi_stop(
    plugin: PluginProcess,
    short_tmp: Path,
    debian_guest,  # type: ignore[no-untyped-def]
    transport: str,
) -> None:
    base_digest = hashlib.sha256(debian_guest.disk.read_bytes()).hexdigest()
    configure(
        plugin, short_tmp / "data", [str(debian_guest.disk.parent)], share_transport=transport
    )
    stream, events = collect_events(plugin)
    alloc = short_tmp / "alloc"
    (alloc / "web").mkdir(parents=True)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    config = {
        **debian_boot(debian_guest),
        # The task environment reaches the guest as /etc/profile.d/nomad-env.sh.
        "cmds": [
            # A process for `nomad alloc signal` to reach: it reports SIGHUP on the console.
            APP,
            f". /etc/profile.d/nomad-env.sh; echo {MARKER} $NOMAD_TASK_NAME > /dev/ttyS0",
        ],
        "default_user_password": "s3cret-pass",
        "default_user_authorized_ssh_key": SSH_KEY,
        "hostname": "web-1",
        "timezone": "Europe/Berlin",
        "user_data": USER_DATA,
        "signal_pidfile": "/run/app.pid",
    }
    cfg = task_config(alloc, config, task_id="alloc/web/deb1")
    cfg.name = "web"
    # Nomad's task directories, and a host volume (volume_mount) the guest may write to.
    (alloc / "web" / "local").mkdir()
    (alloc / "web" / "local" / "hello.txt").write_text("written by a Nomad template\n")
    (alloc / "web" / "secrets").mkdir()
    (alloc / "alloc" / "data").mkdir(parents=True, exist_ok=True)
    volume = short_tmp / "volume"
    volume.mkdir()
    # A host volume the guest may write to must be writable by vm_user, as Nomad's own
    # allocation directories are (mode 0777).
    volume.chmod(0o777)
    cfg.mounts.append(driver_pb2.Mount(task_path="/srv/vol", host_path=str(volume)))
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    cfg.env["NOMAD_TASK_NAME"] = "web"
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        (runtime,) = (alloc / "web").glob("nomad-vm-*")
        seed = runtime / "cidata.iso"
        assert seed.stat().st_mode & 0o777 == 0o600
        assert b"s3cret-pass" not in seed.read_bytes()
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 240), events
        assert fifo.wait_for(MARKER.encode() + b" web", 240), bytes(fifo.data[-3000:])
        check_exec(plugin, cfg.id)
        check_shares(plugin, cfg.id, transport)
        check_nothing_privileged_planted(plugin, cfg.id, volume)
        check_cloud_init(plugin, cfg.id)
        drv(plugin).SignalTask(driver_pb2.SignalTaskRequest(task_id=cfg.id, signal="SIGHUP"))
        assert fifo.wait_for(b"got-sighup", 30), bytes(fifo.data[-2000:])
        assert (volume / "from-guest").read_text() == "hi\n"
        # `nomad alloc signal -s SIGTERM` shuts the machine down through ACPI.
        started = time.monotonic()
        drv(plugin).SignalTask(driver_pb2.SignalTaskRequest(task_id=cfg.id, signal="SIGTERM"))
        result = wait(plugin, cfg.id, timeout=60)
        elapsed = time.monotonic() - started
        destroy(plugin, cfg.id)
    finally:
        stream.cancel()
        fifo.close()
    assert (result.result.exit_code, result.err) == (0, "")
    assert elapsed < 45, f"ACPI shutdown of Debian took {elapsed:.0f}s"
    assert any(m.startswith("Disk prepared: thin copy") for m in events), events
    assert any("SIGTERM received: ACPI shutdown requested" in m for m in events), events
    assert not vm_processes_under(short_tmp)
    assert not list((alloc / "web").glob("nomad-vm-*"))  # local/ and secrets/ are Nomad's
    assert hashlib.sha256(debian_guest.disk.read_bytes()).hexdigest() == base_digest


def test_debian_guest_boots_from_its_disk_alone(
    plugin: PluginProcess,
    short_tmp: Path,
    debian_guest,  # type: ignore[no-untyped-def]
) -> None:
    """No kernel option: SeaBIOS boots the task's disk (extlinux on the image)."""
    configure(plugin, short_tmp / "data", [str(debian_guest.disk.parent)])
    stream, events = collect_events(plugin)
    alloc = short_tmp / "alloc"
    (alloc / "tiny").mkdir(parents=True)
    fifo = FifoReader(alloc / "alloc" / "logs" / ".tiny.stdout.fifo")
    config = {"image": str(debian_guest.disk), "cloud_init": False}
    cfg = task_config(alloc, config, task_id="alloc/tiny/disk1")
    cfg.resources.allocated_resources.memory.memory_mb = 1024
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
        (runtime,) = (alloc / "tiny").glob("nomad-vm-*")
        assert not (runtime / "cidata.iso").exists()  # cloud_init = false
        assert wait_until(lambda: any("Guest agent answered" in m for m in events), 240), events
        assert b"SYSLINUX" in fifo.data, bytes(fifo.data[:2000])
        # The agent starts early in boot; a power button pressed before systemd-logind runs is
        # lost, so wait for the end of the boot (the login prompt) before stopping.
        assert fifo.wait_for(b"login:", 240), bytes(fifo.data[-2000:])
        stop(plugin, cfg.id, 60)
        result = wait(plugin, cfg.id)
        destroy(plugin, cfg.id)
    finally:
        stream.cancel()
        fifo.close()
    assert (result.result.exit_code, result.err) == (0, "")
    assert not vm_processes_under(short_tmp)
