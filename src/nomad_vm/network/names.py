"""Names and MAC addresses derived from a task id: pure, deterministic functions.

Derived rather than stored so that a restarted plugin (or ``nomad-vm doctor``) can find a
task's TAP device, MAC and firewall rules from the task id alone, with no state file to lose.

The hashes are SHA-256 of the UTF-8 task id. Interface names use lowercase base32
(``a-z2-7``): 5 bits a character instead of hex's 4, which matters inside Linux's 15-character
limit, and every character is valid in an interface name.

MAC addresses come in three disjoint families, told apart by their first octet, so that a hash
can never make one equal to another:

* ``0x52``: the guest's NIC (QEMU's own locally administered prefix starts with it too);
* ``0xfe``: the host end of a TAP (the guest's MAC with the first octet replaced, as libvirt
  does). It must differ from the guest's: a bridge treats its ports' own MACs as local, so a
  TAP carrying the guest's MAC would make the bridge swallow every frame meant for the guest;
* ``0x02``: a bridge, set explicitly so that its MAC (the guests' gateway MAC) no longer follows
  the lowest MAC among its ports and does not change when a TAP comes or goes.
"""

from __future__ import annotations

import base64
import hashlib
import re

from nomad_vm.errors import ConfigError

# Linux IFNAMSIZ is 16 including the terminating NUL.
IFNAME_MAX = 15
# 8 base32 characters are 40 bits: a collision among 10,000 tasks has odds of about 1 in 20,000.
MIN_HASH_CHARS = 8
DEFAULT_TAP_PREFIX = "nvm"
# Letters, digits, '-' and '_': no '/', ':', '.', whitespace or '%', which Linux, iproute2 or
# sysctl paths (net.ipv4.conf.<ifname>) would read specially.
_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
RULE_TAG_PREFIX = "nomad-vm:"
GUEST_MAC_OCTET = 0x52
TAP_MAC_OCTET = 0xFE
BRIDGE_MAC_OCTET = 0x02
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_BAD_IFNAME = re.compile(r"[/:\s]")


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8")).digest()


def _b32(value: str) -> str:
    return base64.b32encode(_digest(value)).decode("ascii").rstrip("=").lower()


def tap_name(prefix: str, task_id: str) -> str:
    """``<prefix><hash>``: exactly 15 characters, the hash filling what the prefix leaves."""
    max_prefix = IFNAME_MAX - MIN_HASH_CHARS
    if len(prefix) > max_prefix:
        raise ConfigError(
            "network.tap_prefix",
            f"{prefix!r} is {len(prefix)} characters; use at most {max_prefix} so that "
            f"{MIN_HASH_CHARS} characters of the task hash fit in Linux's {IFNAME_MAX}-character "
            "interface names",
        )
    if not _PREFIX.match(prefix):
        raise ConfigError(
            "network.tap_prefix",
            f"{prefix!r} is not a valid interface name prefix: start with a letter, then use "
            "only letters, digits, '-' and '_'",
        )
    if not task_id:
        raise ValueError("task_id must not be empty")
    return prefix + _b32(task_id)[: IFNAME_MAX - len(prefix)]


def _mac(first_octet: int, key: str) -> str:
    octets = bytes([first_octet]) + _digest(key)[:5]
    return ":".join(f"{b:02x}" for b in octets)


def mac_address(task_id: str) -> str:
    """The guest NIC's MAC: ``52:`` and 40 bits of the task id's hash (unicast, local)."""
    if not task_id:
        raise ValueError("task_id must not be empty")
    return _mac(GUEST_MAC_OCTET, task_id)


def tap_mac(guest_mac: str) -> str:
    """The MAC for the host end of the guest's TAP: the guest's with first octet ``fe``."""
    mac = guest_mac.lower()
    if not _MAC.match(mac):
        raise ValueError(f"{guest_mac!r} is not a MAC address (six ':'-separated hex octets)")
    return f"{TAP_MAC_OCTET:02x}{mac[2:]}"


def bridge_mac(bridge: str) -> str:
    """A fixed MAC for a bridge we create, from its name (``02:`` and 40 bits of hash)."""
    return _mac(BRIDGE_MAC_OCTET, "bridge:" + bridge)


def rule_tag(owner: str) -> str:
    """The nftables rule comment marking ``owner``'s rules: ``nomad-vm:`` and 16 hash chars.

    A hash because nft comments are limited to 128 bytes and a Nomad task id is not.
    """
    if not owner:
        raise ValueError("owner must not be empty")
    return RULE_TAG_PREFIX + _b32(owner)[:16]


def is_owner_tag(comment: str) -> bool:
    """Whether ``comment`` is a ``rule_tag`` (as opposed to a per-bridge rule's tag)."""
    rest = comment.removeprefix(RULE_TAG_PREFIX)
    return rest != comment and re.fullmatch(r"[a-z2-7]{16}", rest) is not None


def check_device_name(name: str, field: str) -> None:
    """A name the kernel could give an existing interface (its ``dev_valid_name``): 1 to 15
    bytes, not ``.`` or ``..``, no ``/``, ``:`` or whitespace. Wider than our own links' names
    (``links.check_ifname``): an operator's VLAN interface is ``eth0.100``."""
    size = len(name.encode())
    if 0 < size <= IFNAME_MAX and name not in (".", "..") and not _BAD_IFNAME.search(name):
        return
    raise ConfigError(
        field,
        f"{name!r} is not a network interface name: 1 to {IFNAME_MAX} bytes, without '/', ':' "
        "or whitespace",
    )
