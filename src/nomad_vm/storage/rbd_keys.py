"""How a cephx key reaches QEMU and qemu-img: never on a command line, never in a file on
disk. The key is written into a memfd (``memfd_create``: anonymous memory, no name in any
directory), sealed against writes and resizes, and the process inherits the descriptor and
reads it as ``-object secret,file=/proc/self/fd/N,format=base64``.

Reopening ``/proc/self/fd/N`` checks the inode's permissions against the opener, so the
memfd is given to the user the VMM runs as (``owner``), mode 0400: readable by that user's
process that holds it and nobody else (other processes reach it only through
``/proc/<pid>/fd``, which needs ptrace rights over that process).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from nomad_vm.storage.held import FileHolder, HeldFile

_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def key_memfd(secret: str, holder: FileHolder, owner: int | None) -> HeldFile:
    """A sealed, 0400 memfd holding ``secret``, owned by uid ``owner`` (None: the plugin's
    own user), registered with ``holder``."""
    fd = os.memfd_create("cephx-key", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    held = holder.add(HeldFile(Path("cephx-key"), fd))
    data = secret.encode()
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    if owner is not None and owner != os.geteuid():
        os.fchown(fd, owner, -1)
    os.fchmod(fd, 0o400)
    return held
