"""A fake of Cloud Hypervisor's REST API: HTTP (the standard library's server) on a unix socket,
the VMM's state machine as CH's ``vmm/src/lib.rs`` has it, and its event monitor's output.

It is a test of our client, not proof of CH: every request body is read by the typed model,
strictly (``from_json(..., strict=True)``), so a property our client misspells, or a value of
the wrong type, is a 400 with the model's message, as CH's serde would refuse it (or worse,
ignore it). Used in-process (``serve_in_thread``) by the client tests, and by
``tests/fakes/cloud_hypervisor.py``, the fake ``cloud-hypervisor`` executable the backend
launches.

Guest behaviour, as the tiny guest's and the in-process fake's: from the kernel command line,
``nomadvm.ignore_acpi=1`` and ``fake.then=poweroff|panic|reboot`` with ``fake.after=<s>``.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nomad_vm.vm.cloud_hypervisor.model import (
    ModelError,
    VmConfig,
    VmInfo,
    VmmPingResponse,
    VmState,
    from_json,
    to_json,
)

VERSION = "53.0"


@dataclass
class FakeVmm:
    """CH's VMM as its API sees it. ``exit`` is called when the VMM would end (vmm.shutdown, a
    guest power-off without ``no_shutdown``)."""

    events_path: Path | None = None
    no_shutdown: bool = True
    exit: Callable[[], None] = lambda: None
    on_boot: Callable[[FakeVmm], None] = lambda vmm: None
    config: VmConfig | None = None
    # "Running" while the VM exists, None once torn down (CH drops the Vm, keeps the config).
    running: bool = False
    # vm.pause'd: the vCPUs (the simulated guest) do nothing until vm.resume.
    paused: bool = False
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    # Connections to each virtio-fs device's virtiofsd, held while the VMM runs (as CH's
    # vhost-user frontend does: a virtiofsd exits when its connection closes).
    vhost_user: list[socket.socket] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        if self.events_path is not None:
            self.events_path.write_bytes(b"")  # CH truncates it when it starts
        self.event("vmm", "starting")

    # -- the event monitor --------------------------------------------------------------------

    def event(self, source: str, event: str, properties: dict[str, str] | None = None) -> None:
        """As CH's event_monitor writes it: pretty JSON, then a blank line."""
        if self.events_path is None:
            return
        elapsed = time.monotonic() - self.started
        document = {
            "timestamp": {"secs": int(elapsed), "nanos": int((elapsed % 1) * 1e9)},
            "source": source,
            "event": event,
            "properties": properties,
        }
        with open(self.events_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(document, indent=2) + "\n\n")

    # -- what the guest does -------------------------------------------------------------------

    def guest_powers_off(self) -> None:
        with self.lock:
            if not self.running:
                return
            self.running = False
            self.event("vm", "shutdown")
            if not self.no_shutdown:
                self.vmm_shutdown()

    def guest_panics(self) -> None:
        self.event("guest", "panic", {"event": "panicked"})

    def guest_reboots(self) -> None:
        self.event("vm", "rebooting")
        self.event("vm", "rebooted")

    def vmm_shutdown(self) -> None:
        """``vmm.shutdown``, and what SIGTERM does too: vm_delete (which shuts a running VM
        down first), then the VMM exits."""
        with self.lock:
            if self.running:
                self.running = False
                self.event("vm", "shutdown")
            if self.config is not None:
                self.config = None
                self.event("vm", "deleted")
            self.event("vmm", "shutdown")
        self.exit()

    # -- the API -------------------------------------------------------------------------------

    def handle(self, method: str, endpoint: str, body: Any) -> tuple[int, Any]:
        with self.lock:
            self.requests.append((method, endpoint, body))
            route = ROUTES.get((method, endpoint))
            if route is None:
                return 404, f"no {method} {endpoint}"
            return route(self, body)


def _ping(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    return 200, to_json(VmmPingResponse(VERSION, f"v{VERSION}-fake", os.getpid()))


def _create(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    if vmm.config is not None:
        return 500, "VmAlreadyCreated"
    try:
        vmm.config = from_json(VmConfig, body, strict=True)
    except ModelError as exc:
        return 400, f"Error parsing VmConfig: {exc}"
    return 204, None


def _boot(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    if vmm.config is None:
        return 500, "VmNotCreated"
    if vmm.running:
        return 500, "VmAlreadyBooted"
    for net in vmm.config.net or ():
        # CH opens a TAP by name in its own network namespace (TUNSETIFF on /dev/net/tun).
        try:
            socket.if_nametoindex(net.tap or "")
        except OSError:
            return 500, f"Error creating virtio-net device: no TAP {net.tap!r} in this namespace"
    for fs in vmm.config.fs or ():
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(fs.socket)
        except OSError as exc:
            conn.close()
            return 500, f"Failed to connect to vhost-user backend {fs.socket}: {exc}"
        vmm.vhost_user.append(conn)
    vmm.event("vm", "booting")
    vmm.running = True
    vmm.event("vm", "booted")
    vmm.on_boot(vmm)
    return 204, None


def _info(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    if vmm.config is None:
        return 404, "VmNotCreated"
    state = VmState.RUNNING if vmm.running else VmState.CREATED
    if vmm.running and vmm.paused:
        state = VmState.PAUSED
    size = vmm.config.memory.size if vmm.config.memory else 512 * 2**20
    return 200, to_json(VmInfo(vmm.config, state, size))


def _counters(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    if not vmm.running:
        return 500, "VmNotRunning"
    return 200, {"_disk0": {"read_bytes": 4096, "write_bytes": 0}}


def _power_button(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    if not vmm.running:
        return 500, "VmNotRunning"
    vmm.event("vm", "power-button")  # not CH's (it logs none); harmless to the parser
    # A paused guest's vCPUs cannot take the ACPI event: nothing happens.
    hears = vmm.config is not None and "nomadvm.ignore_acpi=1" not in (
        vmm.config.payload.cmdline or ""
    )
    if hears and not vmm.paused:
        threading.Timer(0.01, vmm.guest_powers_off).start()
    return 204, None


def _pause(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    # CH refuses a transition that is not one (Paused -> Paused) as an invalid state change.
    if not vmm.running or vmm.paused:
        return 500, "Error pausing VM: InvalidStateTransition"
    vmm.paused = True
    vmm.event("vm", "pausing")
    vmm.event("vm", "paused")
    return 204, None


def _resume(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    if not vmm.running or not vmm.paused:
        return 500, "Error resuming VM: InvalidStateTransition"
    vmm.paused = False
    vmm.event("vm", "resuming")
    vmm.event("vm", "resumed")
    return 204, None


def _vmm_shutdown(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    # Answered first, then the VMM goes (CH replies before its control loop exits).
    threading.Timer(0.01, vmm.vmm_shutdown).start()
    return 204, None


ROUTES: dict[tuple[str, str], Callable[[FakeVmm, Any], tuple[int, Any]]] = {
    ("GET", "vmm.ping"): _ping,
    ("PUT", "vm.create"): _create,
    ("PUT", "vm.boot"): _boot,
    ("GET", "vm.info"): _info,
    ("GET", "vm.counters"): _counters,
    ("PUT", "vm.power-button"): _power_button,
    ("PUT", "vm.pause"): _pause,
    ("PUT", "vm.resume"): _resume,
    ("PUT", "vmm.shutdown"): _vmm_shutdown,
}
PREFIX = "/api/v1/"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: UnixHTTPServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self.path.startswith(PREFIX):
            self._reply(404, f"not under {PREFIX}")
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            self._reply(400, f"body is not JSON: {exc}")
            return
        status, reply = self.server.vmm.handle(method, self.path[len(PREFIX) :], body)
        self._reply(status, reply)

    def _reply(self, status: int, reply: Any) -> None:
        data = b""
        if reply is not None:
            data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
        self.send_response(status)
        if reply is not None and not isinstance(reply, str):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        return


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, socket_path: Path, vmm: FakeVmm) -> None:
        self.vmm = vmm
        super().__init__(str(socket_path), _Handler)


def serve_in_thread(socket_path: Path, vmm: FakeVmm) -> UnixHTTPServer:
    """The fake API on ``socket_path`` in this process; ``shutdown()`` and ``server_close()``
    it when done."""
    server = UnixHTTPServer(socket_path, vmm)
    threading.Thread(target=server.serve_forever, name="fake CH API", daemon=True).start()
    return server
