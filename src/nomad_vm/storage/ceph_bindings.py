"""The Ceph Python bindings (``rados``, ``rbd``), imported narrowly.

Debian ships them as compiled modules for its own python3 (``python3-rados``,
``python3-rbd``, in ``/usr/lib/python3/dist-packages``); they are not on PyPI. The plugin's
venv must not see the rest of Debian's dist-packages (other versions of our own
dependencies live there), so when a plain ``import rados`` fails, exactly these two modules
are loaded from that directory by file name, and only when built for this interpreter's ABI
(``EXT_SUFFIX``, e.g. ``.cpython-311-x86_64-linux-gnu.so``): a venv on another Python minor
version gets a clear reason instead of a crash.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import sysconfig
from types import ModuleType

DIST_PACKAGES = os.environ.get("NOMAD_VM_CEPH_BINDINGS_DIR", "/usr/lib/python3/dist-packages")
PACKAGES = "python3-rados and python3-rbd"


class CephUnavailable(Exception):
    """The bindings cannot be loaded here; the message says why and what to install."""


def load() -> tuple[ModuleType, ModuleType]:
    """``(rados, rbd)``; CephUnavailable when either cannot be loaded."""
    return _load("rados"), _load("rbd")  # rbd's module imports rados: rados first


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    path = os.path.join(DIST_PACKAGES, f"{name}{suffix}")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not os.path.exists(path):
        raise CephUnavailable(
            f"the Ceph binding {name!r} is not installed for this Python ({path} is missing): "
            f"install Debian's {PACKAGES} for Python "
            f"{sys.version_info.major}.{sys.version_info.minor}"
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # an ABI mismatch or a missing librados shows up here
        del sys.modules[name]
        raise CephUnavailable(f"cannot load the Ceph binding {path}: {exc}") from None
    return module
