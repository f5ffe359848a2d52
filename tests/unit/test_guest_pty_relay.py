"""The frame format shared by the host (guest_terminal) and the relay running in the guest."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from nomad_vm.vm import guest_pty_relay as relay

frame = st.tuples(st.sampled_from([b"d", b"w", b"e", b"x"]), st.binary(max_size=300))


@given(st.lists(frame, max_size=8), st.integers(min_value=1, max_value=64))
def test_frames_survive_any_split(frames: list[tuple[bytes, bytes]], piece: int) -> None:
    wire = b"".join(relay.encode_frame(kind, payload) for kind, payload in frames)
    decoded: list[tuple[bytes, bytes]] = []
    pending = b""
    for i in range(0, len(wire), piece):
        got, pending = relay.decode_frames(pending + wire[i : i + piece])
        decoded += got
    assert decoded == frames and pending == b""


def test_incomplete_frame_is_kept() -> None:
    wire = relay.encode_frame(relay.INPUT, b"hello")
    assert relay.decode_frames(wire[:-1]) == ([], wire[:-1])


def test_exit_status_of_a_code_and_a_signal() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    assert relay.exit_status(os.waitpid(pid, 0)[1]) == 7
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), 9)
    assert relay.exit_status(os.waitpid(pid, 0)[1]) == -9
