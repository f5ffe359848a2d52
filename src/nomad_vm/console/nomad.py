"""What the console server asks the local Nomad agent: are ACLs on, whose token is this, and
may this token `alloc exec` into this allocation.

The last question is answered by Nomad itself, not by re-implementing its policy engine
(namespace globs, roles, deny rules, workload identities): the server opens the agent's
`alloc exec` websocket for the allocation with the caller's token and **no command**. Nomad
(client/alloc_endpoint.go, v1.11) resolves the token, checks `alloc-exec` in the
allocation's own namespace, and only then validates the request, so the exec ends at once
with "command is not present" for a token that may, and "Permission denied" for one that may
not. No command runs and nothing reaches the driver; Nomad logs the attempt ("task exec
session starting", with the token's name) as it logs every exec. Anything but that one answer
(an unknown allocation, an agent error, another Nomad that validates first) is a refusal, so
a change in Nomad fails closed... except a Nomad that checked the command before the token,
which tests/e2e/test_console_agent.py would catch (a token without alloc-exec must be refused).

Tokens travel only in the X-Nomad-Token header and are never logged.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp
import httpx

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-Nomad-Token"
# Nomad's exec websocket closes with this reason when the token passed the alloc-exec check
# and the (deliberately) empty command was then refused.
_ALLOWED_REASON = "command is not present"
_TIMEOUT = 10.0


class NomadUnavailable(Exception):
    """The agent did not answer, or answered what no Nomad agent answers."""


class TLSConfigError(Exception):
    """NOMAD_CACERT / NOMAD_CLIENT_CERT / NOMAD_CLIENT_KEY name files that cannot be used."""


@dataclass(frozen=True)
class TokenInfo:
    accessor: str
    name: str
    management: bool


@dataclass(frozen=True)
class TLSSettings:
    """The `nomad` CLI's environment variables for an HTTPS agent."""

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    @classmethod
    def from_env(cls) -> TLSSettings:
        return cls(
            os.environ.get("NOMAD_CACERT"),
            os.environ.get("NOMAD_CLIENT_CERT"),
            os.environ.get("NOMAD_CLIENT_KEY"),
        )

    def context(self) -> ssl.SSLContext:
        """The context both clients (httpx and aiohttp) verify the agent with and present
        the client certificate from; TLSConfigError names the variable that is wrong."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_cert)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"NOMAD_CACERT: cannot load {self.ca_cert!r}: {exc}") from None
        if self.client_key and not self.client_cert:
            raise TLSConfigError("NOMAD_CLIENT_KEY is set but NOMAD_CLIENT_CERT is not")
        if self.client_cert:
            try:
                ctx.load_cert_chain(self.client_cert, self.client_key)
            except (OSError, ssl.SSLError) as exc:
                raise TLSConfigError(
                    f"NOMAD_CLIENT_CERT/NOMAD_CLIENT_KEY: cannot load {self.client_cert!r}"
                    f" / {self.client_key!r}: {exc}"
                ) from None
        return ctx


class NomadAgent:
    def __init__(self, address: str, tls: TLSSettings | None = None) -> None:
        self.address = address.rstrip("/")
        self.tls = tls or TLSSettings()
        # Plain http:// ignores the variables, as the nomad CLI does.
        self._ssl = self.tls.context() if self.address.startswith("https") else None
        self._http = httpx.AsyncClient(
            base_url=self.address,
            timeout=_TIMEOUT,
            verify=self._ssl if self._ssl is not None else True,
        )
        self._ws: aiohttp.ClientSession | None = None

    def _unreachable(self, exc: Exception) -> NomadUnavailable:
        message = f"Nomad agent at {self.address}: {exc}"
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ssl.SSLCertVerificationError):
                message += (
                    " (NOMAD_CACERT must name the CA file that signed the agent's certificate;"
                    f" it is {self.tls.ca_cert or 'not set'})"
                )
                break
            cause = cause.__cause__ or cause.__context__
        return NomadUnavailable(message)

    async def close(self) -> None:
        await self._http.aclose()
        if self._ws is not None:
            await self._ws.close()

    async def _token_self(self, token: str | None) -> httpx.Response:
        headers = {TOKEN_HEADER: token} if token else {}
        try:
            return await self._http.get("/v1/acl/token/self", headers=headers)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    async def acls_enabled(self) -> bool:
        """Asked of the policy list, which says "ACL support disabled" when they are off
        (token/self does not: with ACLs off it answers 404, as for an unknown token). With
        ACLs on and no token it answers with the anonymous policy's view (200) or 403."""
        try:
            resp = await self._http.get("/v1/acl/policies")
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if resp.status_code == 400 and "ACL support disabled" in resp.text:
            return False
        if resp.status_code in (200, 403):
            return True
        raise NomadUnavailable(
            f"Nomad agent at {self.address}: /v1/acl/policies answered {resp.status_code}"
        )

    async def token_info(self, token: str) -> TokenInfo | None:
        """The token's identity, or None when Nomad does not know it."""
        resp = await self._token_self(token)
        if resp.status_code != 200:
            return None
        body = resp.json()
        return TokenInfo(
            accessor=str(body.get("AccessorID", "")),
            name=str(body.get("Name", "")),
            management=body.get("Type") == "management",
        )

    async def may_exec(self, token: str | None, alloc_id: str, task: str) -> bool:
        """Does Nomad let ``token`` `alloc exec` into ``task`` of ``alloc_id``?"""
        if self._ws is None:
            self._ws = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT))
        query = urlencode({"task": task, "command": json.dumps([]), "tty": "false"})
        url = f"{self.address}/v1/client/allocation/{alloc_id}/exec?{query}"
        headers = {TOKEN_HEADER: token} if token else {}
        try:
            async with self._ws.ws_connect(
                url, headers=headers, ssl=self._ssl if self._ssl is not None else True
            ) as ws:
                message = await ws.receive(timeout=_TIMEOUT)
                reason = str(message.extra or "") if message.type == aiohttp.WSMsgType.CLOSE else ""
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("alloc exec check for %s failed: %s", alloc_id, exc)
            return False
        if reason != _ALLOWED_REASON:
            log.info("alloc exec check for %s/%s refused: %s", alloc_id, task, reason or "closed")
        return reason == _ALLOWED_REASON
