"""The operator view: `nomad-vm vm list | info | pause | resume` against the real plugin process
and a real QEMU (tiny guest, TCG), its root-only socket, and the socket across plugin restarts."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

from nomad_vm.control.protocol import socket_path
from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from tests.conftest import REPO, qemu_processes_under, wait_until
from tests.integration.pluginkit import DRIVER, configure, drv, tiny_task
from tests.integration.test_recovery import recover
from tests.integration.test_vm_lifecycle import RUNNING, collect_events, destroy, stop, wait

CLI = REPO / ".venv" / "bin" / "nomad-vm"
VM_USER = "nomad-vm"


def vm_cli(data_dir: Path, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(CLI), "vm", *args, "--data-dir", str(data_dir)]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def vm_json(data_dir: Path, *args: str) -> Any:
    done = vm_cli(data_dir, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_list_info_pause_resume_and_the_socket_across_restarts(
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    data_dir = short_tmp / "data"
    images = short_tmp / "images"
    images.mkdir()
    disk = images / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    paths = [str(tiny_guest.vmlinux.parent), str(images)]
    first = PluginProcess([str(DRIVER)])
    first.start(short_tmp / "plugin1.stderr")
    second: PluginProcess | None = None
    try:
        with tiny_task(
            first,
            short_tmp,
            tiny_guest,
            alloc_name="ctl",
            overrides={"image": str(disk)},
            image_paths=paths,
        ) as (cfg, fifo, _):
            stream, events = collect_events(first)
            handle = drv(first).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60).handle
            assert fifo.wait_for(RUNNING, 180)
            (qemu,) = qemu_processes_under(short_tmp)
            sock = socket_path(data_dir, "vm")
            _assert_root_only(sock)

            listed = vm_json(data_dir, "list")
            assert [(v["task_id"], v["state"], v["pid"]) for v in listed] == [
                (cfg.id, "running", qemu.pid)
            ]
            table = vm_cli(data_dir, "list")
            assert table.returncode == 0 and "running" in table.stdout, table
            assert cfg.alloc_id[:8] in table.stdout and str(qemu.pid) in table.stdout

            info = vm_json(data_dir, "info", cfg.alloc_id[:8])  # a prefix of the allocation id
            assert info["state"] == "running" and info["pid"] == qemu.pid
            assert info["accelerator"] in ("tcg", "kvm") and info["vcpus"] == 1
            assert info["memory_bytes"] == 160 * 1024 * 1024
            assert info["uptime_seconds"] >= 0 and info["problems"] == []
            shown, seed = info["disks"]
            # The files QEMU really has open (descriptors resolved): the overlay in the task's
            # runtime dir over the job's image, and the cloud-init seed.
            assert shown["file"].startswith(info["runtime_dir"]), shown
            assert (shown["format"], shown["backing"], shown["read_only"]) == (
                "qcow2",
                str(disk),
                False,
            ), shown
            assert seed["file"].endswith("cidata.iso") and seed["read_only"], seed
            assert Path(info["console_socket"]).is_socket()
            text = vm_cli(data_dir, "info", cfg.id)
            assert text.returncode == 0, text.stderr
            assert "Accelerator:" in text.stdout and shown["file"] in text.stdout

            paused = vm_json(data_dir, "pause", cfg.id)
            assert paused["state"] == "paused"
            assert wait_until(lambda: any(m.startswith("VM paused") for m in events), 10)
            assert vm_json(data_dir, "list")[0]["state"] == "paused"

            refused = vm_cli(data_dir, "info", "no-such-task")
            assert refused.returncode == 1 and "no-such-task" in refused.stderr, refused
            stream.cancel()

            # The plugin dies: nobody answers; its VM runs on, still paused.
            first.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            first.wait_exit(5)
            gone = vm_cli(data_dir, "list")
            assert gone.returncode == 1 and "no plugin answers" in gone.stderr, gone
            assert qemu.is_running()

            second = PluginProcess([str(DRIVER)])
            second.start(short_tmp / "plugin2.stderr")
            configure(second, data_dir, paths)
            recover(second, handle)
            _assert_root_only(sock)
            again = vm_json(data_dir, "list")
            assert [(v["task_id"], v["state"], v["pid"]) for v in again] == [
                (cfg.id, "paused", qemu.pid)
            ]
            assert vm_json(data_dir, "resume", cfg.id)["state"] == "running"

            assert stop(second, cfg.id, 20) < 15
            assert wait(second, cfg.id).result.exit_code == 0
            assert vm_json(data_dir, "list")[0]["state"] == "exited"
            destroy(second, cfg.id)
            assert vm_json(data_dir, "list") == []

            # A graceful plugin shutdown (Driver.Shutdown) takes its socket away.
            drv(second).Shutdown(driver_pb2.ShutdownRequest(), timeout=2)
            assert wait_until(lambda: not sock.exists(), 5)
    finally:
        first.kill()
        if second is not None:
            second.kill()
    assert not qemu_processes_under(short_tmp)


def _assert_root_only(sock: Path) -> None:
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    parent = os.stat(sock.parent)
    assert stat.S_IMODE(parent.st_mode) == 0o700 and parent.st_uid == 0
    # The VMs' own user (and any other) cannot even reach it.
    denied = vm_cli(sock.parent.parent, "list", user=VM_USER)
    assert denied.returncode == 1 and "permission denied" in denied.stderr, denied
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n sys.exit(3)\n"
    )
    connect = ["setpriv", f"--reuid={VM_USER}", f"--regid={VM_USER}", "--clear-groups"]
    done = subprocess.run([*connect, "/usr/bin/python3", "-c", probe, str(sock)], check=False)
    assert done.returncode == 3


def test_the_socket_refuses_a_peer_of_another_uid_even_when_reachable(
    plugin: PluginProcess, short_tmp: Path
) -> None:
    """Defence in depth: were the directory and socket opened up (a mistaken chmod), the
    server still answers nobody but its own uid (SO_PEERCRED): a refusal, sent on connect."""
    data_dir = short_tmp / "data"
    configure(plugin, data_dir, [])
    # The plugin Nomad uses serves it from its first fingerprint on.
    fingerprints = drv(plugin).Fingerprint(driver_pb2.FingerprintRequest())
    next(fingerprints)
    sock = socket_path(data_dir, "vm")
    assert wait_until(sock.exists, 10)
    data_dir.chmod(0o755)
    sock.parent.chmod(0o755)
    sock.chmod(0o666)
    probe = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "print(s.recv(4096).decode())\n"
    )
    connect = ["setpriv", f"--reuid={VM_USER}", f"--regid={VM_USER}", "--clear-groups"]
    done = subprocess.run(
        [*connect, "/usr/bin/python3", "-c", probe, str(sock)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ok": False, "error": "permission denied"}
    fingerprints.cancel()
