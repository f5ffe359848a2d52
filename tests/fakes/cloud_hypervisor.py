"""A fake ``cloud-hypervisor`` executable: the fake API (``tests/fakes/ch_api.py``) served on
the listening socket of ``--api-socket fd=N``, CH's events written to ``--event-monitor fd=N``,
and the serial port (mode Tty) on stdout, which the backend makes the task's stdout. At
``vm.boot`` it opens the disks, payload files and TAPs by the names it is given, as CH does, so
a file or TAP its user may not open fails the boot as it would fail CH's.

It takes the command line the backend gives CH (and refuses anything else, so a change there
is noticed), exits 0 on SIGTERM and on ``vmm.shutdown`` as CH does, and simulates the guest
from its kernel command line (see ``ch_api``). SIGUSR1 makes the guest do its ``fake.then`` act
now (a test's "while the plugin was away"). Run through ``wrapper(path)``, a shell script that
execs this module with the system's Python (the backend runs it as the unprivileged vm_user,
who cannot reach the test's venv; the fake needs only the standard library and our model), so
the backend can be pointed at it as its ``bin``.

A test of our client and backend, not proof of CH.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from tests.fakes.ch_api import VERSION, FakeVmm, serve_in_thread

REPO = Path(__file__).resolve().parents[2]
# On the fake's command line (it names no path of the task: CH gets descriptors), so tests find
# it with ``processes_under(root, FAKE_CH)``, which also matches its working directory.
FAKE_CH = "tests.fakes.cloud_hypervisor"
# Debian 12's python3: any user may run it (the venv's interpreter may be under /root).
SYSTEM_PYTHON = "/usr/bin/python3"


def wrapper(path: Path) -> Path:
    """An executable at ``path`` that runs this fake (exec: the pid stays the gate's). Its
    directory must be searchable by vm_user (``short_tmp``, not pytest's ``tmp_path``)."""
    path.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH='{REPO}:{REPO / 'src'}' exec {SYSTEM_PYTHON} -P -m "
        'tests.fakes.cloud_hypervisor "$@"\n'
    )
    path.chmod(0o755)
    return path


def _fd_option(value: str) -> int:
    """``fd=N``: the backend hands CH its sockets and files, it names no path."""
    key, _, fd = value.partition("=")
    if key != "fd" or not fd.isdigit():
        raise argparse.ArgumentTypeError(f"expected fd=<descriptor>, got {value!r}")
    os.fstat(int(fd))  # inherited, or this is not how the backend started us
    return int(fd)


def main(argv: list[str]) -> int:
    if argv == ["--version"]:
        print(f"cloud-hypervisor v{VERSION}")
        return 0
    parser = argparse.ArgumentParser(prog="cloud-hypervisor")
    parser.add_argument("--api-socket", type=_fd_option, required=True)
    parser.add_argument("--event-monitor", type=_fd_option, required=True)
    parser.add_argument("--seccomp", choices=("true", "false", "log"), required=True)
    parser.add_argument("--no-shutdown", action="store_true")
    args = parser.parse_args(argv)
    done = threading.Event()
    guest = Guest()
    vmm = FakeVmm(
        None,
        args.no_shutdown,
        args.event_monitor,
        exit=done.set,
        on_boot=guest.booted,
        on_restore=guest.restored,
    )
    server = serve_in_thread(args.api_socket, vmm)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=vmm.vmm_shutdown).start())
    signal.signal(signal.SIGUSR1, lambda *_: guest.act())
    while not done.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    return 0


# How often the counting guest (``fake.count=1``) prints its next number.
COUNT_EVERY = 0.2


class Guest:
    """The simulated guest: its console line at boot, its ``fake.then`` act, and its counter."""

    def __init__(self) -> None:
        self.vmm: FakeVmm | None = None
        self.then = ""

    @staticmethod
    def _words(vmm: FakeVmm) -> dict[str, str]:
        cmdline = (vmm.config.payload.cmdline or "") if vmm.config else ""
        return dict(w.split("=", 1) for w in cmdline.split() if "=" in w)

    def restored(self, vmm: FakeVmm) -> None:
        """Back from a snapshot: no boot, no console line; the counter goes on once resumed."""
        self.vmm = vmm
        if self._words(vmm).get("fake.count") == "1":
            self._count(vmm)

    def _count(self, vmm: FakeVmm) -> None:
        def run() -> None:
            while vmm.running:
                with vmm.lock:
                    if not vmm.paused:
                        vmm.memory["count"] = vmm.memory.get("count", 0) + 1
                        os.write(1, f"count {vmm.memory['count']}\n".encode())
                time.sleep(COUNT_EVERY)

        threading.Thread(target=run, name="counting guest", daemon=True).start()

    def booted(self, vmm: FakeVmm) -> None:
        self.vmm = vmm
        cmdline = (vmm.config.payload.cmdline or "") if vmm.config else ""
        words = self._words(vmm)
        self.then = words.get("fake.then", "")
        # fake.agent_vsock=<port>: the guest's qemu-ga listens on that vsock port, as the seed's
        # unit makes a real guest's do.
        if vmm.vsock is not None and "fake.agent_vsock" in words:
            vmm.vsock.agent_port = int(words["fake.agent_vsock"])
            vmm.vsock.console_fd = 1
        os.write(1, f"fake cloud-hypervisor guest: booted ({cmdline})\n".encode())
        if words.get("fake.count") == "1":
            self._count(vmm)
        after = float(words.get("fake.after", "0"))
        if self.then and after < 3600:
            threading.Timer(after, self.act).start()

    def act(self) -> None:
        vmm = self.vmm
        if vmm is None:
            return
        if self.then == "poweroff":
            vmm.guest_powers_off()
        elif self.then == "panic":
            vmm.guest_panics()
        elif self.then == "reboot":
            vmm.guest_reboots()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
