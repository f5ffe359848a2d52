"""The control server on its own (no driver, no VM): permissions as bound, a bad request
answered naming the field, an idle client not holding up the close, its socket removed."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

from nomad_vm.driver.control_server import ControlServer


def no_key() -> bytes:
    raise AssertionError("no test here snapshots a VM")

def test_bound_root_only_answers_and_closes_despite_an_idle_client(tmp_path: Path) -> None:
    path = tmp_path / "data" / "control" / "control.sock"

    async def scenario() -> None:
        server = ControlServer(path, dict, no_key)
        await server.start()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"op": "list"}\n{"op": "info"}\n{"op": "list", "x": 1}\n')
        replies = [json.loads(await reader.readline()) for _ in range(3)]
        assert replies[0] == {"ok": True, "result": []}
        assert replies[1]["ok"] is False and replies[1]["error"].startswith("task: info needs")
        assert replies[2] == {"ok": False, "error": "x: not a field of a request (op, task)"}
        idle_reader, idle_writer = await asyncio.open_unix_connection(str(path))
        await asyncio.wait_for(server.close(), 2)
        assert not path.exists()
        assert await idle_reader.read() == b""
        for w in (writer, idle_writer):
            w.close()

    asyncio.run(scenario())


def test_a_stale_socket_is_replaced_and_a_newer_one_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "control" / "control.sock"

    async def scenario() -> None:
        first = ControlServer(path, dict, no_key)
        await first.start()
        second = ControlServer(path, dict, no_key)  # a new plugin while the old one still runs
        await second.start()
        await first.close()
        assert path.exists(), "the old plugin must not remove the new one's socket"
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"op": "list"}\n')
        assert json.loads(await reader.readline())["ok"] is True
        writer.close()
        await second.close()
        assert not path.exists()

    asyncio.run(scenario())
