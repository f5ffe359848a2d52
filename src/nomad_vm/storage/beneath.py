"""Open a path below a directory without following any symlink: openat2(2) with
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`` (Linux 5.6+).

The kernel walks the path itself and refuses (``EXDEV``, ``ELOOP``) any step that would leave
the directory or pass a symlink, so a component swapped for a symlink between a check and the
open is refused, not followed. Python (3.11) has no binding for the system call, hence this one
call through ctypes; ``OSError(ENOSYS)`` on kernels without it.
"""

from __future__ import annotations

import ctypes
import errno
import os

# The same number on every architecture (the system call came after the tables were unified).
_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
# What a refused walk looks like.
REFUSED_WALK = (errno.ELOOP, errno.EXDEV)


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def open_beneath(dir_fd: int, relative: str, flags: int) -> int:
    """``relative`` opened with ``flags`` below the directory ``dir_fd``, through no symlink.
    OSError as ``os.open`` raises it (``errno`` in ``REFUSED_WALK`` for a refused walk)."""
    how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = int(
        _libc.syscall(
            _SYS_OPENAT2,
            ctypes.c_int(dir_fd),
            ctypes.c_char_p(os.fsencode(relative)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
    )
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), relative)
    return fd
