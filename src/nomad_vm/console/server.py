"""`nomad-vm console serve`: the web service (aiohttp) that lists this node's VM consoles a
caller may open and bridges noVNC to the VM's VNC socket.

Who the caller is: an X-Nomad-Token header (scripts), or the session cookie the login form
gives (browsers). What they may open: ``access.Consoles`` (Nomad's own alloc-exec check).
Every page and the websocket check again; the websocket and the forms also check that the
request's Origin is this server (a page elsewhere cannot drive a signed-in browser).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from aiohttp import web

from nomad_vm.console import pages
from nomad_vm.console.access import Consoles
from nomad_vm.console.bridge import relay
from nomad_vm.console.nomad import (
    TOKEN_HEADER,
    NomadAgent,
    NomadUnavailable,
    TLSConfigError,
    TLSSettings,
)
from nomad_vm.console.registry import ConsoleEntry
from nomad_vm.console.sessions import COOKIE, Sessions

log = logging.getLogger(__name__)

NOVNC_DIR = Path("/usr/share/novnc")
DEFAULT_LISTEN = "127.0.0.1:5800"
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    # Not no-referrer: with it Chromium sends "Origin: null" on our own forms, which the
    # origin check would refuse.
    "Referrer-Policy": "same-origin",
}
# The access log: never headers or cookies (the token travels in them).
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf'


class ConfigurationError(Exception):
    """A setting that would make the server unsafe or unable to run; the CLI prints it."""


@dataclass(frozen=True)
class ServeSettings:
    host: str
    port: int
    nomad_address: str
    data_dirs: tuple[Path, ...]
    # Listen beyond loopback although Nomad's ACLs are off (anyone reaching it gets every
    # console): only when the operator says so.
    allow_remote_without_acl: bool = False
    novnc_dir: Path = NOVNC_DIR
    # How to reach an https:// agent (the nomad CLI's NOMAD_CACERT & co.).
    tls: TLSSettings = field(default_factory=TLSSettings)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"--listen: {value!r} is not HOST:PORT (e.g. {DEFAULT_LISTEN})")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigurationError(f"--listen: {host!r} is not an IP address") from None
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


class ConsoleServer:
    def __init__(self, settings: ServeSettings, agent: NomadAgent) -> None:
        self.settings = settings
        self.agent = agent
        self.consoles = Consoles(agent, settings.data_dirs)
        self.sessions = Sessions()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_headers])
        app.router.add_get("/", self.index)
        app.router.add_post("/login", self.login)
        app.router.add_post("/logout", self.logout)
        app.router.add_get("/api/consoles", self.api_consoles)
        app.router.add_get("/vm/{alloc}/{task}", self.console_page)
        app.router.add_get("/vm/{alloc}/{task}/vnc", self.vnc)
        app.router.add_static("/novnc", self.settings.novnc_dir)
        app.router.add_static("/static", Path(str(files("nomad_vm.console") / "static")))
        return app

    # -- who is asking ------------------------------------------------------------------

    def _session_id(self, request: web.Request) -> str | None:
        return request.cookies.get(COOKIE)

    def _token(self, request: web.Request) -> tuple[str | None, str | None]:
        """(token, who) of the caller; (None, None) when they gave none."""
        header = request.headers.get(TOKEN_HEADER)
        if header:
            return header, "token"
        session = self.sessions.get(self._session_id(request))
        if session is not None:
            return session.token, session.name
        return None, None

    async def _acls(self) -> bool:
        try:
            return await self.agent.acls_enabled()
        except NomadUnavailable as exc:
            raise web.HTTPServiceUnavailable(text=str(exc)) from None

    def _banner(self, acls: bool) -> str | None:
        return None if acls else pages.NO_ACL_BANNER

    # -- pages --------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        acls = await self._acls()
        token, who = self._token(request)
        if acls and token is None:
            return _html(pages.login(None))
        entries = await self.consoles.allowed(token)
        return _html(pages.listing(entries, self._banner(acls), who if acls else None))

    async def login(self, request: web.Request) -> web.Response:
        _check_origin(request)
        form = await request.post()
        token = str(form.get("token", "")).strip()
        if not await self._acls():
            raise web.HTTPSeeOther("/")
        info = await self.agent.token_info(token) if token else None
        if info is None:
            return _html(pages.login(None, "Nomad does not know this token."), status=403)
        response = web.HTTPSeeOther("/")
        session_id = self.sessions.create(token, info.name or info.accessor[:8])
        response.set_cookie(
            COOKIE,
            session_id,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            path="/",
        )
        log.info("console sign-in by token %s", info.accessor[:8])
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        _check_origin(request)
        self.sessions.end(self._session_id(request))
        response = web.HTTPSeeOther("/")
        response.del_cookie(COOKIE, path="/")
        raise response

    async def api_consoles(self, request: web.Request) -> web.Response:
        acls = await self._acls()
        token, _ = self._token(request)
        if acls and token is None:
            raise web.HTTPUnauthorized(text=f"a Nomad token is needed ({TOKEN_HEADER})")
        entries = await self.consoles.allowed(token)
        return web.json_response(
            {
                "acls": acls,
                "consoles": [
                    {
                        "alloc_id": e.alloc_id,
                        "task": e.task,
                        "namespace": e.namespace,
                        "job": e.job,
                        "display": e.display,
                        "path": pages.console_path(e),
                    }
                    for e in entries
                ],
            }
        )

    async def _entry(self, request: web.Request) -> tuple[bool, ConsoleEntry]:
        acls = await self._acls()
        token, _ = self._token(request)
        if acls and token is None:
            raise web.HTTPUnauthorized(text="sign in first")
        entry = await self.consoles.find(
            token, request.match_info["alloc"], request.match_info["task"]
        )
        if entry is None:
            # The same for a VM that does not exist and one the caller may not open.
            raise web.HTTPForbidden(text="no such console, or your token may not open it")
        return acls, entry

    async def console_page(self, request: web.Request) -> web.Response:
        acls, entry = await self._entry(request)
        return _html(pages.console(entry, self._banner(acls)))

    async def vnc(self, request: web.Request) -> web.StreamResponse:
        _check_origin(request)
        _, entry = await self._entry(request)
        ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=0)
        await ws.prepare(request)
        log.info("console opened: %s from %s", entry.key, request.remote)
        await relay(ws, entry.socket)
        return ws


@web.middleware
async def _headers(request: web.Request, handler: object) -> web.StreamResponse:
    response: web.StreamResponse = await handler(request)  # type: ignore[operator]
    if not response.prepared:
        response.headers.update(_SECURITY_HEADERS)
    return response


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, content_type="text/html", status=status)


def _check_origin(request: web.Request) -> None:
    """A browser names the page that sent a form or opened a websocket; it must be ours."""
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not a browser's cross-site request (browsers always send it for these)
    expected = f"{request.scheme}://{request.host}"
    if origin != expected:
        raise web.HTTPForbidden(text="cross-origin request refused")


async def check_settings(settings: ServeSettings, agent: NomadAgent) -> bool:
    """Whether Nomad's ACLs are on; ConfigurationError when listening would be unsafe."""
    try:
        acls = await agent.acls_enabled()
    except NomadUnavailable as exc:
        raise ConfigurationError(f"--nomad-addr: {exc}") from None
    if not settings.novnc_dir.joinpath("core", "rfb.js").is_file():
        raise ConfigurationError(
            f"noVNC is not in {settings.novnc_dir}: install Debian's novnc package"
        )
    if not acls:
        if not is_loopback(settings.host) and not settings.allow_remote_without_acl:
            raise ConfigurationError(
                f"--listen: Nomad's ACLs are disabled, so anyone reaching {settings.host} "
                "would get every VM console; listen on 127.0.0.1, enable ACLs, or pass "
                "--allow-remote-without-acl"
            )
        log.warning(
            "NOMAD ACLS ARE DISABLED: every VM console on this node is open to anyone who "
            "can reach %s:%d, without a token",
            settings.host,
            settings.port,
        )
    return acls


def connect_agent(settings: ServeSettings) -> NomadAgent:
    """The client for the local agent, with the TLS settings; ConfigurationError names the
    variable whose file cannot be used."""
    try:
        return NomadAgent(settings.nomad_address, settings.tls)
    except TLSConfigError as exc:
        raise ConfigurationError(str(exc)) from None


async def run(settings: ServeSettings) -> None:
    """Serve until cancelled."""
    agent = connect_agent(settings)
    try:
        acls = await check_settings(settings, agent)
        runner = web.AppRunner(
            ConsoleServer(settings, agent).app(), access_log_format=ACCESS_LOG_FORMAT
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, settings.port)
            await site.start()
            log.info(
                "serving VM consoles on http://%s:%d (Nomad %s, ACLs %s)",
                settings.host,
                settings.port,
                settings.nomad_address,
                "enabled" if acls else "DISABLED",
            )
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
    finally:
        await agent.close()
