"""What the driver asks for (``CloudInitRequest``) and what goes on the seed (``SeedDocuments``).

Both are frozen: a request is built once per task start from validated task options and the
task environment, and rendering it has no other input (so the output is a function of it,
apart from the password hash's random salt and the MIME boundary).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# The default user's name when the driver does not choose another. Cloud-init merges our
# settings into the image's own default user (groups, sudo, shell), only the name changes.
DEFAULT_USER = "nomad"


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if mapping is None else MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class GuestMount:
    """A host directory shared with the guest, mounted at ``path``; ``transport`` is "9p" or
    "virtiofs" (how the VM presents it)."""

    tag: str
    path: str
    readonly: bool
    transport: str = "9p"


@dataclass(frozen=True)
class AgentVsock:
    """qemu-guest-agent must listen on vsock (Cloud Hypervisor has no virtio-serial port):
    ``cid`` is the guest's own context id, ``port`` the port the plugin connects to."""

    cid: int
    port: int


@dataclass(frozen=True)
class CloudInitRequest:
    """Everything the seed of one task start holds.

    ``password`` is the plaintext ``default_user_password``: it lives only in memory and leaves
    this package hashed (SHA-512 crypt). ``repr`` leaves it out so that a logged request cannot
    leak it. ``user_data_text`` is the user's document as already read by the driver (inline
    text or the file ``user_data`` named). ``network_config`` is a netplan-style v2 mapping,
    set only when the task has a static address. ``online_hotplug_memory`` adds a
    ``bootcmd`` (``memory_online``).
    """

    instance_id: str
    hostname: str
    timezone: str | None = None
    password: str | None = field(default=None, repr=False)
    ssh_authorized_key: str | None = None
    cmds: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    user_data_text: str | None = field(default=None, repr=False)
    network_config: Mapping[str, Any] | None = None
    default_user: str = DEFAULT_USER
    mounts: tuple[GuestMount, ...] = ()
    agent_vsock: AgentVsock | None = None
    # The VM has hot-pluggable memory (memory_max): the guest is told to online it as movable.
    online_hotplug_memory: bool = False
    # The NIC's name servers (its `dns`, else the plugin's): also written to resolv.conf by a
    # bootcmd on images that cannot apply network-config's (``resolv``).
    name_servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Frozen copies: the caller's dicts may change after the request was made.
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        object.__setattr__(self, "network_config", _frozen(self.network_config))
        object.__setattr__(self, "cmds", tuple(self.cmds))
        object.__setattr__(self, "name_servers", tuple(self.name_servers))


@dataclass(frozen=True)
class SeedDocuments:
    """The files of a NoCloud seed, as text (UTF-8 on the ISO).

    ``warnings`` are notes for a task event: environment variables that could not be passed
    to the guest because their names are not shell identifiers. They never hold values.
    """

    meta_data: str
    user_data: str = field(repr=False)
    network_config: str | None = None
    warnings: tuple[str, ...] = ()
