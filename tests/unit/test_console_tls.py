"""`nomad-vm console serve` reaches an HTTPS Nomad agent with the nomad CLI's TLS variables.

The agent here is a stand-in HTTPS server on 127.0.0.1 (an ephemeral port) with a CA, a
server and a client certificate made for the test; it requires the client certificate, as a
Nomad agent with `verify_https_client` does. The server's own start-up check (the one `run`
makes) must pass with NOMAD_CACERT + NOMAD_CLIENT_CERT/KEY, and fail naming the cause without
them. The real Nomad agent's answers: tests/e2e/test_console_agent.py (plain HTTP)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import WSCloseCode, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nomad_vm.cli.console import serve_settings
from nomad_vm.cli.main import build_parser
from nomad_vm.console.nomad import TLSSettings
from nomad_vm.console.server import (
    ConfigurationError,
    ServeSettings,
    check_settings,
    connect_agent,
    run,
)

TLS_VARS = ("NOMAD_CACERT", "NOMAD_CLIENT_CERT", "NOMAD_CLIENT_KEY")


class Pki:
    """A CA and the server (127.0.0.1) and client certificates it signed, as PEM files."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._now = datetime.datetime.now(datetime.UTC)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nomad-vm test CA")])
        self._ca_name = ca_name
        ca = (
            self._builder(ca_name, self._ca_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.ca = self._write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))
        self.server_cert, self.server_key = self._leaf(
            "server",
            ExtendedKeyUsageOID.SERVER_AUTH,
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        )
        self.client_cert, self.client_key = self._leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH)

    def _builder(
        self, subject: x509.Name, key: ec.EllipticCurvePrivateKey
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._now - datetime.timedelta(minutes=5))
            .not_valid_after(self._now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )

    def _leaf(
        self,
        name: str,
        usage: x509.ObjectIdentifier,
        san: x509.SubjectAlternativeName | None = None,
    ) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}.nomad-vm.test")])
        builder = (
            self._builder(subject, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                critical=False,
            )
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return (
            self._write(f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            self._write(f"{name}-key.pem", key_pem),
        )

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.touch(mode=0o600)
        path.write_bytes(data)
        return path


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def novnc(tmp_path: Path) -> Path:
    """What check_settings looks for of noVNC (the console pages are not served here)."""
    (tmp_path / "novnc" / "core").mkdir(parents=True)
    (tmp_path / "novnc" / "core" / "rfb.js").write_text("")
    return tmp_path / "novnc"


async def policies(request: web.Request) -> web.Response:
    return web.Response(status=400, text="ACL support disabled")  # Nomad with ACLs off


async def exec_endpoint(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"command is not present")
    return ws


def with_https_agent(pki: Pki, body: Callable[[str], Awaitable[None]]) -> None:
    """Runs ``body(address)`` while a stand-in agent serves HTTPS with client certificates."""

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/acl/policies", policies)
        app.router.add_get("/v1/client/allocation/{alloc}/exec", exec_endpoint)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        try:
            await body(f"https://127.0.0.1:{runner.addresses[0][1]}")
        finally:
            await runner.cleanup()

    asyncio.run(main())


def settings_from_cli(address: str, novnc: Path, data_dir: Path) -> ServeSettings:
    """What `nomad-vm console serve` would run with, the environment as it is now."""
    args = build_parser().parse_args(
        ["console", "serve", "--nomad-addr", address, "--data-dir", str(data_dir)]
    )
    settings = serve_settings(args)
    return ServeSettings(
        settings.host,
        0,  # an ephemeral port, should `run` listen
        settings.nomad_address,
        settings.data_dirs,
        novnc_dir=novnc,
        tls=settings.tls,
    )


async def start_up_check(settings: ServeSettings) -> tuple[bool, bool]:
    """What `run` does before it listens, and one alloc-exec check: (acls, may exec)."""
    agent = connect_agent(settings)
    try:
        return await check_settings(settings, agent), await agent.may_exec("t", "a1", "vm")
    finally:
        await agent.close()


def set_tls_env(monkeypatch: pytest.MonkeyPatch, **values: Path | None) -> None:
    for var in TLS_VARS:
        value = values.get(var.removeprefix("NOMAD_").lower())
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(value))


def test_the_cli_builds_the_agent_client_with_the_tls_variables(
    pki: Pki, novnc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_tls_env(monkeypatch, cacert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
    settings = settings_from_cli("https://127.0.0.1:4646", novnc, tmp_path)
    assert settings.tls == TLSSettings(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    agent = connect_agent(settings)
    try:
        assert agent.tls == settings.tls
        # The context both clients use trusts the CA (and only it: no system CAs).
        assert agent._ssl is not None
        assert [dict(c["subject"][0])["commonName"] for c in agent._ssl.get_ca_certs()] == [
            "nomad-vm test CA"
        ]
    finally:
        asyncio.run(agent.close())


def test_the_start_up_check_passes_over_https_with_the_variables(
    pki: Pki, novnc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_tls_env(monkeypatch, cacert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)

    async def body(address: str) -> None:
        settings = settings_from_cli(address, novnc, tmp_path)
        # ACLs off (answered over HTTPS by httpx); the exec check over wss (aiohttp).
        assert await start_up_check(settings) == (False, True)

    with_https_agent(pki, body)


class Serving(logging.Handler):
    """Sets ``started`` when the console server logs that it listens."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("serving VM consoles"):
            self.started.set()


def test_the_server_itself_starts_against_the_https_agent(
    pki: Pki, novnc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` (what the CLI calls) uses the variables: with an agent that requires them it gets
    past its check and listens (on an ephemeral port), then stops when cancelled."""
    set_tls_env(monkeypatch, cacert=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
    logger = logging.getLogger("nomad_vm.console.server")
    serving = Serving()
    logger.addHandler(serving)
    level = logger.level
    # setLevel, not the attribute: it also clears the logger's cached answers to "is INFO on".
    logger.setLevel(logging.INFO)

    async def body(address: str) -> None:
        settings = settings_from_cli(address, novnc, tmp_path)
        server = asyncio.create_task(run(settings))
        started = asyncio.create_task(serving.started.wait())
        # The bound is for a broken test only: either event comes in well under a second.
        await asyncio.wait({server, started}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        try:
            assert started.done(), (
                f"run ended: {server.exception()!r}" if server.done() else "run never listened"
            )
        finally:
            started.cancel()
            server.cancel()
            with pytest.raises(asyncio.CancelledError):
                await server

    try:
        with_https_agent(pki, body)
    finally:
        logger.removeHandler(serving)
        logger.setLevel(level)


def test_without_nomad_cacert_the_check_fails_saying_so(
    pki: Pki, novnc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_tls_env(monkeypatch, client_cert=pki.client_cert, client_key=pki.client_key)

    async def body(address: str) -> None:
        settings = settings_from_cli(address, novnc, tmp_path)
        with pytest.raises(ConfigurationError) as failed:
            await start_up_check(settings)
        message = str(failed.value)
        assert message.startswith(f"--nomad-addr: Nomad agent at {address}:")
        assert "CERTIFICATE_VERIFY_FAILED" in message
        assert "NOMAD_CACERT must name the CA file" in message and "not set" in message

    with_https_agent(pki, body)


def test_without_the_client_certificate_the_agent_refuses(
    pki: Pki, novnc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_tls_env(monkeypatch, cacert=pki.ca)

    async def body(address: str) -> None:
        settings = settings_from_cli(address, novnc, tmp_path)
        with pytest.raises(ConfigurationError, match=f"^--nomad-addr: Nomad agent at {address}"):
            await start_up_check(settings)

    with_https_agent(pki, body)


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"cacert": "missing"}, "NOMAD_CACERT: cannot load"),
        ({"cacert": "server-key.pem"}, "NOMAD_CACERT: cannot load"),
        ({"client_cert": "missing"}, "NOMAD_CLIENT_CERT/NOMAD_CLIENT_KEY: cannot load"),
        ({"client_cert": "client.pem", "client_key": "server-key.pem"}, "NOMAD_CLIENT_CERT"),
        ({"client_key": "client-key.pem"}, "NOMAD_CLIENT_KEY is set but NOMAD_CLIENT_CERT"),
    ],
)
def test_an_unusable_tls_file_is_named(
    pki: Pki,
    novnc: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str],
    named: str,
) -> None:
    set_tls_env(monkeypatch, **{k: pki.dir / v for k, v in variables.items()})
    settings = settings_from_cli("https://127.0.0.1:4646", novnc, tmp_path)
    with pytest.raises(ConfigurationError, match=f"^{named}"):
        connect_agent(settings)


def test_plain_http_ignores_the_variables_as_the_nomad_cli_does(
    novnc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_tls_env(monkeypatch, cacert=tmp_path / "missing")
    agent = connect_agent(settings_from_cli("http://127.0.0.1:4646", novnc, tmp_path))
    try:
        assert agent._ssl is None
    finally:
        asyncio.run(agent.close())
