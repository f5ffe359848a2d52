"""Name servers for guests whose images cannot apply cloud-init's.

cloud-init puts a NIC's ``nameservers`` into the image's own network configuration. On images
with netplan, systemd-resolved or NetworkManager that reaches ``/etc/resolv.conf``; on Debian's
ifupdown images it becomes a ``dns-nameservers`` line, which only the ``resolvconf`` package
acts on, so a Debian 12 guest without it resolves nothing (cloud-init issue 4255). Seed 000's
jobs expect guests to resolve names, so the seed carries a ``bootcmd`` that writes the servers
into ``/etc/resolv.conf`` itself, but only where nothing else manages that file: it is a plain
file (not a link to systemd-resolved's or resolvconf's) and no ``resolvconf`` is installed.

The addresses travel as arguments of ``sh -c``, never inside the script's text.
"""

from __future__ import annotations

from collections.abc import Sequence

# $@: the name servers. Runs at every boot (bootcmd), before the network is configured.
WRITE_RESOLV_CONF = (
    "[ -L /etc/resolv.conf ] || command -v resolvconf >/dev/null 2>&1 || "
    '{ for server in "$@"; do echo "nameserver $server"; done; } >/etc/resolv.conf'
)


def resolv_conf_bootcmd(servers: Sequence[str]) -> list[str] | None:
    """The bootcmd entry (an argv, run without a shell of cloud-init's) for ``servers``."""
    if not servers:
        return None
    return ["sh", "-c", WRITE_RESOLV_CONF, "nomad-vm-resolv", *servers]
