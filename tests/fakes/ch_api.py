"""A fake of Cloud Hypervisor's REST API: HTTP (the standard library's server) on a unix socket,
the VMM's state machine as CH's ``vmm/src/lib.rs`` has it, and its event monitor's output.

It is a test of our client, not proof of CH: every request body is read by the typed model,
strictly (``from_json(..., strict=True)``), so a property our client misspells, or a value of
the wrong type, is a 400 with the model's message, as CH's serde would refuse it (or worse,
ignore it). Used in-process (``serve_in_thread``) by the client tests, and by
``tests/fakes/cloud_hypervisor.py``, the fake ``cloud-hypervisor`` executable the backend
launches.

Guest behaviour, as the tiny guest's and the in-process fake's: from the kernel command line,
``nomadvm.ignore_acpi=1`` and ``fake.then=poweroff|panic|reboot`` with ``fake.after=<s>``;
``fake.count=1``: the guest prints ``count N`` every 0.2 s while it runs (``memory`` holds N,
so a snapshot carries it and a restore continues from it).

``vm.snapshot`` and ``vm.restore`` work as CH's: the VM must be paused; the directory is named
by a ``file://`` URL (relative to the VMM's working directory), must exist, and gets
``config.json``, ``state.json`` (each device's state by device id, and the guest's memory)
and ``memory-ranges``, each created anew; a restore reads them into a VMM without a VM,
refuses a config whose devices are not those of the state, opens the devices as a boot does,
and leaves the VM paused.
"""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nomad_vm.vm.cloud_hypervisor.model import (
    ModelError,
    RestoreConfig,
    VmConfig,
    VmInfo,
    VmmPingResponse,
    VmSnapshotConfig,
    VmState,
    from_json,
    to_json,
)
from tests.fakes.ch_vsock import HybridVsock, serve_vsock

VERSION = "53.0"


@dataclass
class FakeVmm:
    """CH's VMM as its API sees it. ``exit`` is called when the VMM would end (vmm.shutdown, a
    guest power-off without ``no_shutdown``)."""

    events_path: Path | None = None
    no_shutdown: bool = True
    # The event monitor as a descriptor (``--event-monitor fd=N``), written as CH writes it.
    events_fd: int | None = None
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
    # What the VM's devices hold open while it runs (CH opens them at vm.boot): disks,
    # payload files, TAPs. Opened as CH opens them, under the VMM's own user.
    opened: list[int] = field(default_factory=list)
    # The vsock device's hybrid-vsock socket, bound at vm.boot when the VM has one.
    vsock: HybridVsock | None = None
    # What the simulated guest keeps in its RAM (a snapshot saves it, a restore brings it back).
    memory: dict[str, int] = field(default_factory=dict)
    on_restore: Callable[[FakeVmm], None] = lambda vmm: None

    def __post_init__(self) -> None:
        if self.events_path is not None:
            self.events_path.write_bytes(b"")  # CH truncates it when it starts
        self.event("vmm", "starting")

    # -- the event monitor --------------------------------------------------------------------

    def event(self, source: str, event: str, properties: dict[str, str] | None = None) -> None:
        """As CH's event_monitor writes it: pretty JSON, then a blank line."""
        if self.events_path is None and self.events_fd is None:
            return
        elapsed = time.monotonic() - self.started
        document = {
            "timestamp": {"secs": int(elapsed), "nanos": int((elapsed % 1) * 1e9)},
            "source": source,
            "event": event,
            "properties": properties,
        }
        text = (json.dumps(document, indent=2) + "\n\n").encode()
        if self.events_fd is not None:
            os.write(self.events_fd, text)
            return
        assert self.events_path is not None
        with open(self.events_path, "ab") as f:
            f.write(text)

    # -- what the guest does -------------------------------------------------------------------

    def guest_powers_off(self) -> None:
        with self.lock:
            if not self.running:
                return
            self.running = False
            self._close_devices()
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
                self._close_devices()
                self.event("vm", "shutdown")
            if self.config is not None:
                self.config = None
                self.event("vm", "deleted")
            self.event("vmm", "shutdown")
        self.exit()

    def _close_devices(self) -> None:
        """The VM is torn down: its devices let go of their files (CH drops the Vm)."""
        for fd in self.opened:
            os.close(fd)
        self.opened.clear()

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
    failure = _bring_up_devices(vmm)
    if failure:
        return 500, failure
    vmm.event("vm", "booting")
    vmm.running = True
    vmm.event("vm", "booted")
    vmm.on_boot(vmm)
    return 204, None


def _bring_up_devices(vmm: FakeVmm) -> str:
    """What a boot and a restore open: files and TAPs, the vsock socket, each virtiofsd."""
    assert vmm.config is not None
    failure = _open_devices(vmm)
    if failure:
        return failure
    if vmm.config.vsock is not None and vmm.vsock is None:
        try:
            vmm.vsock = serve_vsock(vmm.config.vsock.socket)
        except OSError as exc:
            return f"Error creating virtio-vsock device: {exc}"
    for fs in vmm.config.fs or ():
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(fs.socket)
        except OSError as exc:
            conn.close()
            return f"Failed to connect to vhost-user backend {fs.socket}: {exc}"
        vmm.vhost_user.append(conn)
    return ""


SNAPSHOT_CONFIG, SNAPSHOT_STATE, SNAPSHOT_MEMORY = "config.json", "state.json", "memory-ranges"
# The simulated guest's RAM image: small, whatever the configured size.
MEMORY_IMAGE = b"fake guest memory\n" * 1024


def _device_ids(config: VmConfig) -> list[str]:
    devices = [*(config.disks or ()), *(config.net or ()), *(config.fs or ())]
    if config.vsock is not None:
        devices.append(config.vsock)
    return sorted(d.id or "" for d in devices)


def _snapshot_dir(url: str) -> Path:
    """CH's ``url_to_path``: what follows ``file://``, an existing directory."""
    if not url.startswith("file://"):
        raise ValueError(f"Could not extract path from URL: {url}")
    path = Path(url[len("file://") :])
    if not path.is_dir():
        raise ValueError(f"Destination is not a directory: {str(path)!r}")
    return path


def _snapshot(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    try:
        request = from_json(VmSnapshotConfig, body, strict=True)
    except ModelError as exc:
        return 400, f"Error parsing VmSnapshotConfig: {exc}"
    if not vmm.running or vmm.config is None:
        return 500, "VmNotRunning"
    if not vmm.paused:
        return 500, "Error snapshotting VM: Trying to snapshot while VM is running"
    try:
        directory = _snapshot_dir(request.destination_url)
        state = {"devices": _device_ids(vmm.config), "guest": vmm.memory}
        for name, data in (
            (SNAPSHOT_CONFIG, json.dumps(to_json(vmm.config)).encode()),
            (SNAPSHOT_STATE, json.dumps(state).encode()),
            (SNAPSHOT_MEMORY, MEMORY_IMAGE),
        ):
            with open(directory / name, "xb") as out:  # CH: create_new
                out.write(data)
    except (OSError, ValueError) as exc:
        return 500, f"Error snapshotting VM: {exc}"
    vmm.event("vm", "snapshotting")
    vmm.event("vm", "snapshotted")
    return 204, None


def _restore(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    try:
        request = from_json(RestoreConfig, body, strict=True)
    except ModelError as exc:
        return 400, f"Error parsing RestoreConfig: {exc}"
    if vmm.config is not None:
        return 500, "VmAlreadyCreated"
    try:
        directory = _snapshot_dir(request.source_url)
        config = from_json(
            VmConfig, json.loads((directory / SNAPSHOT_CONFIG).read_bytes()), strict=True
        )
        state = json.loads((directory / SNAPSHOT_STATE).read_bytes())
        if (directory / SNAPSHOT_MEMORY).read_bytes() != MEMORY_IMAGE:
            raise ValueError("memory-ranges is not the guest's memory")
    except (OSError, ValueError, ModelError) as exc:
        return 500, f"Error restoring VM: {exc}"
    if state["devices"] != _device_ids(config):
        # CH finds each device's state by its id: a device without one cannot be restored.
        return 500, f"Error restoring VM: devices {_device_ids(config)} != {state['devices']}"
    vmm.config = config
    failure = _bring_up_devices(vmm)
    if failure:
        vmm.config = None
        return 500, f"Error restoring VM: {failure}"
    vmm.event("vm", "restoring")
    vmm.memory = dict(state["guest"])
    vmm.running, vmm.paused = True, True
    vmm.event("vm", "restored")
    vmm.on_restore(vmm)
    return 204, None


def _open_devices(vmm: FakeVmm) -> str:
    """Open what CH opens at vm.boot, as CH does: the payload's files and the disks by the
    names they are given (read-write unless read-only), each TAP by name (TUNSETIFF on
    /dev/net/tun, in the VMM's namespace, with the VMM's privileges). A refusal is the reason,
    as CH would report it."""
    assert vmm.config is not None
    payload = vmm.config.payload
    files = [(p, False) for p in (payload.kernel, payload.initramfs, payload.firmware) if p]
    files += [(d.path, not d.readonly) for d in vmm.config.disks or ()]
    for path, write in files:
        try:
            vmm.opened.append(os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC))
        except OSError as exc:
            return f"Cannot open {path}: {exc}"
    for net in vmm.config.net or ():
        try:
            vmm.opened.append(_attach_tap(net.tap or ""))
        except OSError as exc:
            return f"Error creating virtio-net device: cannot open TAP {net.tap!r}: {exc}"
    return ""


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def _attach_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        request = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError:
        os.close(fd)
        raise
    return fd


def _info(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    if vmm.config is None:
        return 404, "VmNotCreated"
    state = VmState.RUNNING if vmm.running else VmState.CREATED
    if vmm.running and vmm.paused:
        state = VmState.PAUSED
    size = vmm.config.memory.size if vmm.config.memory else 512 * 2**20
    return 200, to_json(VmInfo(vmm.config, state, size))


BLOCK_COUNTERS = ("read_bytes", "write_bytes", "read_ops", "write_ops")
BLOCK_LATENCIES = tuple(
    f"{op}_latency_{kind}" for op in ("read", "write") for kind in ("min", "max", "avg")
)
NET_COUNTERS = ("rx_bytes", "rx_frames", "tx_bytes", "tx_frames")


def _counters(vmm: FakeVmm, body: Any) -> tuple[int, Any]:
    """CH's VmCounters: device id -> counter -> value, for each block and net device. The
    simulated guest read each disk's first 4 KiB once, in one request, and sent nothing."""
    if not vmm.running or vmm.config is None:
        return 500, "VmNotRunning"
    counters: dict[str, dict[str, int]] = {}
    for i, disk in enumerate(vmm.config.disks or ()):
        block = dict.fromkeys(BLOCK_COUNTERS + BLOCK_LATENCIES, 0)
        block.update(read_bytes=4096, read_ops=1)
        counters[disk.id or f"_disk{i}"] = block
    for i, net in enumerate(vmm.config.net or ()):
        counters[net.id or f"_net{i}"] = dict.fromkeys(NET_COUNTERS, 0)
    return 200, counters


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
    ("PUT", "vm.snapshot"): _snapshot,
    ("PUT", "vm.restore"): _restore,
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

    def __init__(self, address: Path | int, vmm: FakeVmm) -> None:
        self.vmm = vmm
        if isinstance(address, Path):
            super().__init__(str(address), _Handler)
            return
        # A listening socket handed over (``--api-socket fd=N``), as CH takes it.
        super().__init__("", _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = socket.socket(fileno=address)


def serve_in_thread(address: Path | int, vmm: FakeVmm) -> UnixHTTPServer:
    """The fake API on ``address`` (a path to bind, or a listening descriptor) in this
    process; ``shutdown()`` and ``server_close()`` it when done."""
    server = UnixHTTPServer(address, vmm)
    threading.Thread(target=server.serve_forever, name="fake CH API", daemon=True).start()
    return server
