"""ExecTaskStreaming's output frames, and how a session that cannot run reaches the person who
typed `nomad alloc exec`.

Nomad (v1.11) turns an ExecTaskStreaming gRPC error into the text of a websocket close frame
(``command/agent/alloc_endpoint.go`` ``execStreamHandleError``). A close frame holds at most 123
bytes of text (gorilla/websocket ``maxControlFramePayloadSize``): longer text is not sent at all
and the CLI prints "unexpected EOF" instead. Text containing "closed" or "EOF" is dropped on
purpose (``isClosedError``; ``client/fs_endpoint.go`` ``handleStreamResultError``), and the web
UI's terminal never shows a close reason, only stdout frames. What does reach both is the
session's own output and its exit code.

So a session the guest or the user's command cannot run ends as it would in a shell: the reason
on the session's error output (stdout in a terminal session, where the pty merges the streams and
the web UI shows nothing else) and a shell's exit code: 127 when the program is not found, 126
when it cannot be executed (no guest agent, the VM stopped, no relay for a terminal). Errors that
are bugs of ours stay gRPC errors, with a text short enough to get through; the traceback is in
the agent's log.
"""

from __future__ import annotations

import grpc

from nomad_vm.errors import CommandNotRunnable, NomadVMError
from nomad_vm.plugin.proto import driver_pb2 as pb

EXIT_CANNOT_EXECUTE = 126
# Nomad's CLI prints the close text after "rpc error: code = Internal desc = " (34 bytes); the
# frame holds 123 bytes of text.
CLOSE_TEXT_LIMIT = 123 - 34
INTERNAL_ERROR = "internal error in the vm driver; the Nomad client's log has the traceback"
ExecFrame = pb.ExecTaskStreamingResponse
EXEC_CHUNK = 1024  # Nomad's own drivers send exec output in 1 KiB frames


def refusal_exit_code(exc: NomadVMError) -> int:
    """The exit code a shell would give for ``exc``: 127 or 126 (see the module docstring)."""
    if isinstance(exc, CommandNotRunnable):
        return exc.exit_code
    return EXIT_CANNOT_EXECUTE


def refusal_frames(exc: NomadVMError, *, tty: bool) -> list[ExecFrame]:
    """The end of a session that could not run: the reason, the streams' close frames, exit."""
    if tty:
        # The CLI's terminal is in raw mode during the session: a bare \n would not return.
        message = f"nomad-vm: {exc}\r\n".encode()
        frames = output_frames(message, b"", tty=True)
    else:
        frames = output_frames(b"", f"nomad-vm: {exc}\n".encode(), tty=False)
    return [*frames, exited_frame(refusal_exit_code(exc))]


def output_frames(stdout: bytes, stderr: bytes, *, tty: bool) -> list[ExecFrame]:
    """Output in 1 KiB chunks, then a close frame per stream (only stdout in a terminal)."""
    frames = []
    streams = ((True, stdout),) if tty else ((True, stdout), (False, stderr))
    for is_stdout, data in streams:
        ops = [
            pb.ExecTaskStreamingIOOperation(data=data[i : i + EXEC_CHUNK])
            for i in range(0, len(data), EXEC_CHUNK)
        ]
        ops.append(pb.ExecTaskStreamingIOOperation(close=True))
        for op in ops:
            frame = ExecFrame()
            (frame.stdout if is_stdout else frame.stderr).CopyFrom(op)
            frames.append(frame)
    return frames


def exited_frame(exit_code: int, signal: int = 0) -> ExecFrame:
    result = pb.ExitResult(exit_code=exit_code, signal=signal)
    return ExecFrame(exited=True, result=result)


async def abort_internal(context: grpc.aio.ServicerContext) -> None:
    """End the RPC with an error Nomad can pass on whole (never returns)."""
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR)
