"""The console server's decisions, with a stand-in for the Nomad agent (the real agent's
answers are covered by tests/e2e/test_console_agent.py): who sees which console, what
happens without a token, cross-origin requests, and the refusal to listen beyond loopback
when Nomad's ACLs are off."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from nomad_vm.console.nomad import TokenInfo
from nomad_vm.console.registry import (
    ConsoleEntry,
    encode,
    ensure_directory,
    entry_path,
    read_entries,
)
from nomad_vm.console.server import (
    ConfigurationError,
    ConsoleServer,
    ServeSettings,
    check_settings,
    parse_listen,
)
from nomad_vm.console.sessions import COOKIE, Sessions


class StandInAgent:
    """Answers as a Nomad agent would: ``grants`` is token -> allocations it may exec into."""

    def __init__(self, acls: bool, grants: dict[str, set[str]]) -> None:
        self.acls = acls
        self.grants = grants
        self.checked: list[tuple[str | None, str]] = []

    async def acls_enabled(self) -> bool:
        return self.acls

    async def token_info(self, token: str) -> TokenInfo | None:
        return TokenInfo("acc-" + token, token, False) if token in self.grants else None

    async def may_exec(self, token: str | None, alloc_id: str, task: str) -> bool:
        self.checked.append((token, alloc_id))
        return not self.acls or alloc_id in self.grants.get(token or "", set())

    async def close(self) -> None:
        pass


def add_entry(data_dir: Path, alloc: str, namespace: str) -> ConsoleEntry:
    entry = ConsoleEntry(alloc, "vm", namespace, "job-" + alloc, "vga", f"/nowhere/{alloc}")
    ensure_directory(data_dir)
    entry_path(data_dir, f"{alloc}/vm/1").write_bytes(encode(entry))
    return entry


def settings(data_dir: Path, host: str = "127.0.0.1") -> ServeSettings:
    return ServeSettings(host, 5800, "http://127.0.0.1:4646", (data_dir,))


def with_client(
    tmp_path: Path, agent: StandInAgent, body: Callable[[TestClient], Awaitable[None]]
) -> None:
    server = ConsoleServer(settings(tmp_path), agent)  # type: ignore[arg-type]

    async def main() -> None:
        async with TestClient(TestServer(server.app())) as client:
            await body(client)

    asyncio.run(main())


def test_without_a_token_only_the_login_form(tmp_path: Path) -> None:
    add_entry(tmp_path, "a1", "default")
    agent = StandInAgent(True, {"t-ok": {"a1"}})

    async def body(client: TestClient) -> None:
        page = await client.get("/")
        text = await page.text()
        assert page.status == 200 and 'name="token"' in text and "a1" not in text
        assert (await client.get("/api/consoles")).status == 401
        assert (await client.get("/vm/a1/vm")).status == 401
        assert (await client.get("/vm/a1/vm/vnc")).status == 401

    with_client(tmp_path, agent, body)
    assert agent.checked == []


def test_listing_and_pages_follow_nomads_answer(tmp_path: Path) -> None:
    add_entry(tmp_path, "a1", "default")
    add_entry(tmp_path, "b2", "other")
    agent = StandInAgent(True, {"t-ok": {"a1"}, "t-none": set()})

    async def body(client: TestClient) -> None:
        ok = {"X-Nomad-Token": "t-ok"}
        listed = await (await client.get("/api/consoles", headers=ok)).json()
        assert [c["alloc_id"] for c in listed["consoles"]] == ["a1"]
        assert listed["acls"] is True
        page = await client.get("/vm/a1/vm", headers=ok)
        assert page.status == 200 and 'data-ws="/vm/a1/vm/vnc"' in await page.text()
        # Another namespace's VM and an unknown one get the same answer.
        assert (await client.get("/vm/b2/vm", headers=ok)).status == 403
        assert (await client.get("/vm/zz/vm", headers=ok)).status == 403
        none = {"X-Nomad-Token": "t-none"}
        assert (await (await client.get("/api/consoles", headers=none)).json())["consoles"] == []
        assert (await client.get("/vm/a1/vm/vnc", headers=none)).status == 403

    with_client(tmp_path, agent, body)


def test_login_keeps_the_token_in_the_server(tmp_path: Path) -> None:
    add_entry(tmp_path, "a1", "default")
    agent = StandInAgent(True, {"t-ok": {"a1"}})
    server_side: dict[str, str] = {}

    async def body(client: TestClient) -> None:
        refused = await client.post("/login", data={"token": "wrong"}, allow_redirects=False)
        assert refused.status == 403 and "does not know" in await refused.text()
        resp = await client.post("/login", data={"token": "t-ok"}, allow_redirects=False)
        assert resp.status == 303
        cookie = resp.cookies[COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
        assert "t-ok" not in cookie.value
        server_side["cookie"] = cookie.value
        listing = await (await client.get("/")).text()
        assert "/vm/a1/vm" in listing and "Signed in as t-ok" in listing
        # A form from another site is refused.
        evil = await client.post(
            "/logout", headers={"Origin": "http://evil.example"}, allow_redirects=False
        )
        assert evil.status == 403
        await client.post("/logout", allow_redirects=False)
        assert 'name="token"' in await (await client.get("/")).text()

    with_client(tmp_path, agent, body)


def test_websocket_from_another_origin_is_refused(tmp_path: Path) -> None:
    add_entry(tmp_path, "a1", "default")
    agent = StandInAgent(True, {"t-ok": {"a1"}})

    async def body(client: TestClient) -> None:
        headers = {"X-Nomad-Token": "t-ok", "Origin": "http://evil.example"}
        assert (await client.get("/vm/a1/vm/vnc", headers=headers)).status == 403

    with_client(tmp_path, agent, body)


def test_acls_off_opens_everything_with_a_banner(tmp_path: Path) -> None:
    add_entry(tmp_path, "a1", "default")
    agent = StandInAgent(False, {})

    async def body(client: TestClient) -> None:
        text = await (await client.get("/")).text()
        assert "/vm/a1/vm" in text and 'id="banner"' in text and "ACLs are disabled" in text

    with_client(tmp_path, agent, body)


def test_acls_off_refuses_to_listen_beyond_loopback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = StandInAgent(False, {})
    with pytest.raises(ConfigurationError) as caught:
        asyncio.run(check_settings(settings(tmp_path, "0.0.0.0"), agent))  # type: ignore[arg-type]
    assert "--listen" in str(caught.value) and "ACLs are disabled" in str(caught.value)
    assert asyncio.run(check_settings(settings(tmp_path), agent)) is False  # type: ignore[arg-type]
    assert "NOMAD ACLS ARE DISABLED" in caplog.text
    agent.acls = True
    assert asyncio.run(check_settings(settings(tmp_path, "0.0.0.0"), agent)) is True  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["5800", "host:5800", "127.0.0.1:0", "127.0.0.1:x", ":5800"])
def test_bad_listen_values_name_the_option(value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_listen(value)
    assert str(caught.value).startswith("--listen:")


def test_listen_values() -> None:
    assert parse_listen("127.0.0.1:5800") == ("127.0.0.1", 5800)
    assert parse_listen("[::1]:5800") == ("::1", 5800)


def test_registry_ignores_what_others_could_have_written(tmp_path: Path) -> None:
    entry = add_entry(tmp_path, "a1", "default")
    assert read_entries(tmp_path) == [entry]
    (tmp_path / "consoles" / "junk.json").write_text("{not json")
    assert read_entries(tmp_path) == [entry]
    other = entry_path(tmp_path, "x/vm/1")
    other.write_bytes(encode(entry))
    os.chmod(other, 0o666)
    assert read_entries(tmp_path) == [entry]
    os.chmod(tmp_path / "consoles", 0o777)
    assert read_entries(tmp_path) == []
    assert read_entries(tmp_path / "missing") == []


def test_sessions_expire_and_never_show_the_token() -> None:
    now = [0.0]
    sessions = Sessions(lifetime=10, clock=lambda: now[0])
    sid = sessions.create("secret-token", "alice")
    session = sessions.get(sid)
    assert session is not None and session.token == "secret-token"
    assert "secret-token" not in repr(session)
    now[0] = 11
    assert sessions.get(sid) is None and sessions.get(None) is None
