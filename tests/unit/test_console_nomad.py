"""NomadAgent's reading of the agent's answers, against a stand-in HTTP server that answers
as Nomad v1.11 does (the real agent: tests/e2e/test_console_agent.py). Only the one answer
that follows a passed alloc-exec check counts as allowed; everything else is a refusal."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import WSCloseCode, web

from nomad_vm.console.nomad import NomadAgent

# token -> the close reason Nomad's exec websocket ends with for it
CLOSE_REASONS = {
    "may": "command is not present",
    "may-not": "Permission denied",
    "unknown-alloc": "Unknown allocation",
    "almost": "command is not present, or so",
}


SEEN = web.AppKey("seen", list)
ACL_MODE = web.AppKey("acl_mode", str)


async def exec_endpoint(request: web.Request) -> web.WebSocketResponse:
    request.app[SEEN].append(
        {
            **request.query,
            "query": request.query_string,
            "token": request.headers.get("X-Nomad-Token", ""),
        }
    )
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    token = request.headers.get("X-Nomad-Token", "")
    if token == "hang-up":
        await ws.close()
        return ws
    reason = CLOSE_REASONS.get(token, "Permission denied")
    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=reason.encode())
    return ws


async def policies(request: web.Request) -> web.Response:
    if request.app[ACL_MODE] == "off":
        return web.Response(status=400, text="ACL support disabled")
    return web.Response(status=403, text="Permission denied")


async def token_self(request: web.Request) -> web.Response:
    token = request.headers.get("X-Nomad-Token")
    if request.app[ACL_MODE] == "off":
        # Nomad 1.11's WhoAmI: no identity with ACLs off.
        return web.Response(status=404, text="ACL token not found")
    if token == "may":
        return web.json_response({"AccessorID": "acc-1", "Name": "ops", "Type": "client"})
    return web.Response(status=403, text="Permission denied")


def with_agent(
    acl_mode: str, body: Callable[[NomadAgent, list[dict[str, str]]], Awaitable[None]]
) -> None:
    async def main() -> None:
        app = web.Application()
        app[SEEN] = []
        app[ACL_MODE] = acl_mode
        app.router.add_get("/v1/client/allocation/{alloc}/exec", exec_endpoint)
        app.router.add_get("/v1/acl/token/self", token_self)
        app.router.add_get("/v1/acl/policies", policies)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        agent = NomadAgent(f"http://127.0.0.1:{runner.addresses[0][1]}")
        try:
            await body(agent, app[SEEN])
        finally:
            await agent.close()
            await runner.cleanup()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("token", "allowed"),
    [
        ("may", True),
        ("may-not", False),
        ("unknown-alloc", False),
        ("almost", False),
        ("hang-up", False),
        (None, False),
    ],
)
def test_only_the_answer_after_a_passed_check_allows(token: str | None, allowed: bool) -> None:
    async def body(agent: NomadAgent, seen: list[dict[str, str]]) -> None:
        assert await agent.may_exec(token, "a1", "vm task") is allowed
        (request,) = seen
        # The token travels in the header only; the command is empty, the task named.
        assert request["token"] == (token or "")
        assert (token or "x") not in request["query"]
        assert (request["command"], request["task"], request["tty"]) == ("[]", "vm task", "false")

    with_agent("on", body)


def test_an_agent_that_does_not_answer_refuses() -> None:
    agent = NomadAgent("http://127.0.0.1:9")  # discard port: nothing listens
    try:
        assert asyncio.run(agent.may_exec("may", "a1", "vm")) is False
    finally:
        asyncio.run(agent.close())


def test_acl_state_and_token_identity() -> None:
    async def on(agent: NomadAgent, _: list[dict[str, str]]) -> None:
        assert await agent.acls_enabled() is True
        info = await agent.token_info("may")
        assert info is not None and (info.name, info.management) == ("ops", False)
        assert await agent.token_info("nope") is None

    async def off(agent: NomadAgent, _: list[dict[str, str]]) -> None:
        assert await agent.acls_enabled() is False

    with_agent("on", on)
    with_agent("off", off)
