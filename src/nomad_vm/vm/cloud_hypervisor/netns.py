"""Starting Cloud Hypervisor in the network namespace of the TAP it is given.

CH's ``vm.create`` takes no TAP descriptors, so a TAP that lives in another network namespace
(Nomad's group network mode) is reached by name, with CH started inside that namespace:
``nsenter`` (as root) with the namespace taken from the TAP's descriptor (TUNGETDEVNETNS), then
``setpriv`` to vm_user.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Sequence

from nomad_vm.errors import LaunchError

# ioctl(tun_fd, TUNGETDEVNETNS): a descriptor of the TAP's network namespace (Linux >= 5.2).
TUNGETDEVNETNS = 0x54E3


def tap_namespace(fds: Sequence[int]) -> int | None:
    """A descriptor of the network namespace the TAPs (given as descriptors) live in; None
    when every TAP is in ours (named, no descriptor)."""
    if not fds:
        return None
    namespaces = []
    for fd in fds:
        try:
            namespaces.append(fcntl.ioctl(fd, TUNGETDEVNETNS))
        except OSError as exc:
            for ns in namespaces:
                os.close(ns)
            raise LaunchError(f"cannot find the network namespace of a TAP: {exc}") from exc
    first, *others = namespaces
    first_id = os.fstat(first).st_ino
    different = any(os.fstat(ns).st_ino != first_id for ns in others)
    for ns in others:
        os.close(ns)
    if different:
        os.close(first)
        raise LaunchError("Cloud Hypervisor runs in one network namespace; the TAPs are in several")
    return first


def nsenter_argv(netns_fd: int) -> list[str]:
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise LaunchError(
            "nsenter (util-linux) is needed to start Cloud Hypervisor in the TAP's namespace"
        )
    return [nsenter, f"--net=/proc/self/fd/{netns_fd}", "--"]
