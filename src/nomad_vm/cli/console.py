"""`nomad-vm console serve`: the arguments, then ``nomad_vm.console.server.run``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nomad_vm.identity import ALIASES

if TYPE_CHECKING:
    from nomad_vm.console.server import ServeSettings

DEFAULT_NOMAD = "http://127.0.0.1:4646"


def add_console_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    console = sub.add_parser("console", help="VM consoles in the browser")
    console_sub = console.add_subparsers(dest="console_command", required=True)
    serve = console_sub.add_parser(
        "serve",
        help="serve noVNC for this node's VMs with a display, to callers whose Nomad token "
        "may alloc-exec into them",
    )
    serve.add_argument("--listen", default="127.0.0.1:5800", help="HOST:PORT (%(default)s)")
    serve.add_argument(
        "--nomad-addr",
        default=os.environ.get("NOMAD_ADDR", DEFAULT_NOMAD),
        help="the local Nomad agent (default: $NOMAD_ADDR, else %(default)s); "
        "NOMAD_CACERT, NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY apply as for `nomad`",
    )
    serve.add_argument(
        "--data-dir",
        action="append",
        type=Path,
        help="the plugin's data_dir, whose consoles/ lists the VMs (repeat for several "
        "installed names; default: every name's default data_dir)",
    )
    serve.add_argument(
        "--allow-remote-without-acl",
        action="store_true",
        help="listen beyond loopback even when Nomad's ACLs are off (every console is then "
        "open to anyone who reaches the port)",
    )
    serve.set_defaults(func=run_console_serve)


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The server's settings from the arguments and the nomad CLI's TLS variables."""
    from nomad_vm.console.nomad import TLSSettings
    from nomad_vm.console.server import ServeSettings, parse_listen

    host, port = parse_listen(args.listen)
    data_dirs = tuple(args.data_dir or sorted({a.data_dir for a in ALIASES.values()}))
    return ServeSettings(
        host=host,
        port=port,
        nomad_address=args.nomad_addr,
        data_dirs=data_dirs,
        allow_remote_without_acl=args.allow_remote_without_acl,
        tls=TLSSettings.from_env(),
    )


def run_console_serve(args: argparse.Namespace) -> int:
    from nomad_vm.console.server import ConfigurationError, run

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request it makes at INFO: one line per check is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = serve_settings(args)
    except ConfigurationError as exc:
        print(f"nomad-vm console serve: {exc}", file=sys.stderr)
        return 2
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(settings))
    except ConfigurationError as exc:
        print(f"nomad-vm console serve: {exc}", file=sys.stderr)
        return 2
    return 0
