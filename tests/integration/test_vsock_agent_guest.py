"""The guest side of the agent over vsock, as Cloud Hypervisor tasks get it, with a real guest.

CH cannot run a guest on these hosts, and their kernel has no vhost-vsock (no
``/dev/vhost-vsock``: ``CONFIG_VHOST_VSOCK`` is not set), so QEMU's ``vhost-vsock-pci`` cannot
run either. What can: QEMU's ``vhost-user-vsock-pci`` served by rust-vmm's
``vhost-device-vsock`` (crates.io), whose host side is a *hybrid vsock*, the same
``CONNECT <port>`` / ``OK <port>`` unix-socket protocol as CH's (both come from Firecracker's
design). So the Debian test guest boots (TCG) with the cloud-init seed a CH task gets, and
our guest-agent client reaches the qemu-ga that the seed's unit started on vsock, through the
handshake: the seed's unit, qemu-ga's ``vsock-listen`` and our client are real; only the VMM
is QEMU with a vhost-user device instead of CH.

Skipped unless ``vhost-device-vsock`` is on PATH (or named by NOMAD_VM_TEST_VHOST_VSOCK):
``cargo install vhost-device-vsock`` builds it. SLOW: one TCG boot of the Debian guest.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nomad_vm.cloudinit import AgentVsock, CloudInitRequest, render, write_seed
from nomad_vm.errors import HypervisorError
from nomad_vm.vm.cloud_hypervisor.vm_config import AGENT_PORT, GUEST_CID
from nomad_vm.vm.guest_agent import GuestAgent
from tests.conftest import wait_until
from tests.integration.test_cloudinit_seed import QEMU, debian_dir

pytestmark = pytest.mark.integration

BACKEND = os.environ.get("NOMAD_VM_TEST_VHOST_VSOCK") or shutil.which("vhost-device-vsock")
BOOT_TIMEOUT = 600.0


@pytest.mark.skipif(
    BACKEND is None,
    reason="no vhost-device-vsock (cargo install vhost-device-vsock), and this host's kernel "
    "has no vhost-vsock for QEMU's vhost-vsock-pci",
)
def test_qemu_ga_answers_over_vsock_in_the_debian_guest(short_tmp: Path) -> None:
    assert BACKEND is not None
    directory = debian_dir()
    vhost_socket = short_tmp / "vhost-vsock.sock"
    hybrid = short_tmp / "vsock.sock"
    marker = "NVT-VSOCK-SEEDED"
    docs = render(
        CloudInitRequest(
            instance_id=f"nvt-vsock-{time.time_ns()}",
            hostname="nvt-vsock",
            cmds=(f"echo {marker} > /dev/ttyS0",),
            agent_vsock=AgentVsock(GUEST_CID, AGENT_PORT),
        )
    )
    seed = write_seed(docs, short_tmp / "seed.iso")
    overlay = short_tmp / "overlay.qcow2"
    base = str(directory / "disk.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, str(overlay)],
        check=True,
    )
    log = (short_tmp / "backend.log").open("wb")
    backend = subprocess.Popen(
        [BACKEND, "--vm", f"guest-cid={GUEST_CID},socket={vhost_socket},uds-path={hybrid}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    console = short_tmp / "console.log"
    guest = None
    try:
        assert wait_until(vhost_socket.exists, 10), "vhost-device-vsock did not listen"
        cmdline = json.loads((directory / "manifest.json").read_text())["cmdline"]
        # fmt: off
        argv = [
            QEMU, "-accel", "tcg", "-machine", "q35,memory-backend=mem0", "-nodefaults",
            "-vga", "none", "-no-reboot", "-m", "1024", "-smp", "1", "-display", "none",
            # vhost-user devices map guest RAM: shared memory.
            "-object", "memory-backend-memfd,id=mem0,size=1024M,share=on",
            "-serial", f"file:{console}",
            "-drive", f"file={overlay},if=none,id=root,format=qcow2",
            "-device", "virtio-blk-pci,drive=root",
            "-drive", f"file={seed},if=none,id=seed,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=seed",
            "-chardev", f"socket,id=vsock,path={vhost_socket}",
            "-device", "vhost-user-vsock-pci,chardev=vsock",
            "-kernel", str(directory / "vmlinux"), "-initrd", str(directory / "initrd.img"),
            "-append", cmdline,
        ]
        # fmt: on
        guest = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def seeded() -> bool:
            assert guest is not None and guest.poll() is None, "QEMU ended"
            return console.exists() and marker in console.read_text(errors="replace")

        assert wait_until(seeded, BOOT_TIMEOUT), console.read_text(errors="replace")[-3000:]
        hostname, info = asyncio.run(_ask_agent(hybrid, deadline=time.monotonic() + 120))
        assert hostname == "nvt-vsock"
        assert "guest-exec" in {c["name"] for c in info["supported_commands"]}
    finally:
        if guest is not None:
            guest.kill()
            guest.wait()
        backend.kill()
        backend.wait()
        log.close()


async def _ask_agent(hybrid: Path, deadline: float) -> tuple[str, dict[str, object]]:
    """The guest's hostname and qemu-ga's guest-info, once the agent takes a connection on
    vsock (the seed's unit starts it during cloud-init's final stage, about when the marker
    is printed; each failed try is a refused CONNECT)."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        client = GuestAgent(hybrid, vsock_port=AGENT_PORT, rpc_timeout=10)
        try:
            await client.ping(timeout=5)
            info = await client.info()
            result = await client.exec(["/bin/hostname"], timeout=30)
            return result.stdout.decode().strip(), info
        except HypervisorError as exc:
            last = exc
            await asyncio.sleep(1)
        finally:
            await client.close()
    raise AssertionError(f"qemu-ga never answered over vsock: {last}")
