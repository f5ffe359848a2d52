"""The program behind `nomad alloc exec -t`: it runs INSIDE the guest, started by the guest agent.

qemu-guest-agent can start a process but gives it no terminal and streams nothing, so the driver
hot-plugs a virtio-serial port for the session and starts this file with ``python3 -c`` (any
cloud-init image has python3). It finds the port by name, runs the command on a new pty, and relays
between the two in frames: type byte, 4-byte big-endian length, payload.

    host -> guest:  d = input bytes, w = window size (rows, cols: 2 x u16), e = end of input
    guest -> host:  d = terminal output, x = exit status (i32: exit code, or -N for signal N)

The host imports the frame helpers from this module, so both ends share one definition. It must
stay standard-library only and run on old guest Pythons (3.6+): no walrus, no match.
"""

import errno
import fcntl
import glob
import os
import pty
import select
import signal
import struct
import sys
import termios
import time

HEADER = struct.Struct(">cI")
WINDOW = struct.Struct(">HH")
STATUS = struct.Struct(">i")
INPUT, RESIZE, END_OF_INPUT, OUTPUT, EXITED = b"d", b"w", b"e", b"d", b"x"
PORT_WAIT = 20.0  # seconds for the guest kernel to announce the hot-plugged port


def encode_frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def decode_frames(buffer: bytes) -> "tuple[list[tuple[bytes, bytes]], bytes]":
    """The complete frames at the start of ``buffer`` and the incomplete rest."""
    frames = []
    while len(buffer) >= HEADER.size:
        kind, length = HEADER.unpack_from(buffer)
        end = HEADER.size + length
        if len(buffer) < end:
            break
        frames.append((kind, buffer[HEADER.size : end]))
        buffer = buffer[end:]
    return frames, buffer


def exit_status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return -os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def find_port(name: str) -> str:
    """/dev/vportNpM of the port called ``name`` (sysfs, so udev's symlinks are not needed)."""
    deadline = time.time() + PORT_WAIT
    while time.time() < deadline:
        for port in glob.glob("/sys/class/virtio-ports/vport*"):
            try:
                with open(port + "/name") as f:
                    if f.read().strip() == name:
                        return "/dev/" + os.path.basename(port)
            except OSError:
                pass
        time.sleep(0.05)
    sys.exit(f"nomad-vm pty relay: no virtio port named {name} appeared")


def set_window(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def apply_input(master: int, kind: bytes, payload: bytes) -> None:
    if kind == INPUT:
        write_all(master, payload)
    elif kind == RESIZE:
        rows, cols = WINDOW.unpack(payload)
        set_window(master, rows, cols)
    elif kind == END_OF_INPUT:
        # A terminal has no "closed stdin": type the EOF character, as a user would with ^D.
        write_all(master, termios.tcgetattr(master)[6][termios.VEOF])


def relay(port: int, master: int, child: int) -> None:
    pending = b""
    while True:
        ready = select.select([port, master], [], [])[0]
        if master in ready:
            try:
                output = os.read(master, 65536)
            except OSError as exc:  # EIO: every holder of the pty's other side has closed it
                if exc.errno != errno.EIO:
                    raise
                output = b""
            if not output:
                return
            write_all(port, encode_frame(OUTPUT, output))
        if port in ready:
            chunk = os.read(port, 65536)
            if not chunk:  # the host went away: hang up on the session, like a dropped ssh
                os.killpg(child, signal.SIGHUP)
                return
            frames, pending = decode_frames(pending + chunk)
            for kind, payload in frames:
                apply_input(master, kind, payload)


def main(argv: "list[str]") -> None:
    name, rows, cols, command = argv[0], int(argv[1]), int(argv[2]), argv[3:]
    port = os.open(find_port(name), os.O_RDWR | os.O_NOCTTY)
    child, master = pty.fork()
    if child == 0:
        os.environ.setdefault("TERM", "xterm-256color")
        try:
            os.execvp(command[0], command)
        except OSError as exc:
            sys.stderr.write(f"{command[0]}: {exc.strerror}\r\n")
        os._exit(127)
    set_window(master, rows, cols)
    relay(port, master, child)
    status = exit_status(os.waitpid(child, 0)[1])
    write_all(port, encode_frame(EXITED, STATUS.pack(status)))
    os.close(port)


if __name__ == "__main__":
    main(sys.argv[1:])
