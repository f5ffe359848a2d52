"""A fake ``cloud-hypervisor`` executable: the fake API (``tests/fakes/ch_api.py``) served on
``--api-socket path=...``, CH's events written to ``--event-monitor path=...``, and the serial
port (mode Tty) on stdout, which the backend makes the task's stdout.

It takes the command line the backend gives CH (and refuses anything else, so a change there
is noticed), exits 0 on SIGTERM and on ``vmm.shutdown`` as CH does, and simulates the guest
from its kernel command line (see ``ch_api``). SIGUSR1 makes the guest do its ``fake.then`` act
now (a test's "while the plugin was away"). Run through ``wrapper(path)``, a shell script that
execs this module with the test's Python, so the backend can be pointed at it as its ``bin``.

A test of our client and backend, not proof of CH.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from tests.fakes.ch_api import VERSION, FakeVmm, serve_in_thread

REPO = Path(__file__).resolve().parents[2]


def wrapper(path: Path) -> Path:
    """An executable at ``path`` that runs this fake (exec: the pid stays the gate's)."""
    path.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH='{REPO}' exec '{sys.executable}' -P -m tests.fakes.cloud_hypervisor \"$@\"\n"
    )
    path.chmod(0o755)
    return path


def _option(value: str) -> Path:
    key, _, path = value.partition("=")
    if key != "path" or not path:
        raise argparse.ArgumentTypeError(f"expected path=<file>, got {value!r}")
    return Path(path)


def main(argv: list[str]) -> int:
    if argv == ["--version"]:
        print(f"cloud-hypervisor v{VERSION}")
        return 0
    parser = argparse.ArgumentParser(prog="cloud-hypervisor")
    parser.add_argument("--api-socket", type=_option, required=True)
    parser.add_argument("--event-monitor", type=_option, required=True)
    parser.add_argument("--seccomp", choices=("true", "false", "log"), required=True)
    parser.add_argument("--no-shutdown", action="store_true")
    args = parser.parse_args(argv)
    done = threading.Event()
    guest = Guest()
    vmm = FakeVmm(args.event_monitor, args.no_shutdown, exit=done.set, on_boot=guest.booted)
    server = serve_in_thread(args.api_socket, vmm)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=vmm.vmm_shutdown).start())
    signal.signal(signal.SIGUSR1, lambda *_: guest.act())
    while not done.wait(0.5):
        pass
    server.shutdown()
    server.server_close()
    return 0


class Guest:
    """The simulated guest: its console line at boot and its ``fake.then`` act."""

    def __init__(self) -> None:
        self.vmm: FakeVmm | None = None
        self.then = ""

    def booted(self, vmm: FakeVmm) -> None:
        self.vmm = vmm
        cmdline = (vmm.config.payload.cmdline or "") if vmm.config else ""
        words = dict(w.split("=", 1) for w in cmdline.split() if "=" in w)
        self.then = words.get("fake.then", "")
        os.write(1, f"fake cloud-hypervisor guest: booted ({cmdline})\n".encode())
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
