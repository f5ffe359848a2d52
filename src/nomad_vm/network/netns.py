"""Run a function inside a network namespace, in a fresh thread.

A namespace is given by name (``/run/netns/NAME``, as ``ip netns add`` makes it) or by the
absolute path of its nsfs file (what Nomad hands a driver for a group network namespace, e.g.
``/var/run/netns/<alloc id>``).

A thread, not a child process: ``setns(CLONE_NEWNET)`` changes only the calling thread's
namespace, and everything that thread then creates stays bound to that namespace: netlink
sockets, TAP devices made by ioctl on ``/dev/net/tun``, subprocesses it starts (``nft``), and
files it opens under ``/proc/sys/net`` (which show the sysctls of the opener's namespace). The
plugin serves gRPC from several threads, and forking such a process without exec (as
``pyroute2``'s own ``netns=`` support does) can deadlock the child on a lock another thread held.

A fresh thread for every call, never a pooled one, so no later work can run by accident in a
namespace left behind. Calls without a namespace also get a fresh thread: the same code path,
and ``pyroute2``'s synchronous API runs its own asyncio loop, which fails inside a thread that
already runs one (the plugin's).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from nomad_vm.errors import NetworkError

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: its namespace type
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_T = TypeVar("_T")
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> Path:
    """``/run/netns/NAME`` (``ip netns add NAME`` creates it), or ``name`` itself when it is an
    absolute path; checked to exist."""
    if name.startswith("/"):
        path = Path(name)
        if ".." in path.parts:
            raise NetworkError(f"{name!r} is not a network namespace path")
        if not path.exists():
            raise NetworkError(f"network namespace {name} does not exist")
        return path
    if not _NAME.match(name) or name in (".", ".."):
        raise NetworkError(f"{name!r} is not a network namespace name (see `ip netns list`)")
    path = NETNS_DIR / name
    if not path.exists():
        raise NetworkError(f"network namespace {name!r} does not exist ({path} is missing)")
    return path


def netns_exists(netns: str) -> bool:
    """True when ``netns`` (a name or a path) names a live network namespace: its file exists
    and is an nsfs mount (an unmounted leftover file is not a namespace)."""
    try:
        path = netns_path(netns)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (NetworkError, OSError):
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:  # ENOTTY: a plain file, not a namespace
        return False
    finally:
        os.close(fd)


def run_in(netns: str | None, fn: Callable[[], _T]) -> _T:
    """``fn()`` in a new thread that first entered ``netns`` (None: the plugin's own)."""
    path = netns_path(netns) if netns is not None else None
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            if path is not None:
                _enter(path)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns:{netns or '-'}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _enter(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetworkError(f"cannot enter network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)
