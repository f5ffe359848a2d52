"""Cloud-init NoCloud seeds: a typed request -> the seed's documents -> an ISO labelled cidata.

``render`` is pure (no files, no processes); ``write_seed`` is the only function that touches
the host. Nothing here knows about Nomad's protocol or QEMU: the driver builds the request from
the task's options and attaches the ISO it gets back.
"""

from __future__ import annotations

from nomad_vm.cloudinit.model import AgentVsock, CloudInitRequest, GuestMount, SeedDocuments
from nomad_vm.cloudinit.render import USER_PART_MERGE_TYPE, render, with_network_config
from nomad_vm.cloudinit.seed import write_seed

__all__ = [
    "USER_PART_MERGE_TYPE",
    "AgentVsock",
    "CloudInitRequest",
    "GuestMount",
    "SeedDocuments",
    "render",
    "with_network_config",
    "write_seed",
]
