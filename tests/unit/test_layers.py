"""Imports only point down (docs/architecture.md): checked on the source, not by convention."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "nomad_vm"

# package -> modules (prefixes) it must never import
FORBIDDEN = {
    "plugin": ("nomad_vm.vm", "nomad_vm.storage", "nomad_vm.guests", "nomad_vm.cli"),
    "driver": ("nomad_vm.plugin", "grpc", "google.protobuf", "nomad_vm.cli"),
    "vm": ("nomad_vm.driver", "nomad_vm.plugin", "grpc", "nomad_vm.cli"),
    "storage": ("nomad_vm.driver", "nomad_vm.plugin", "nomad_vm.vm", "grpc", "nomad_vm.cli"),
    "guests": ("nomad_vm.driver", "nomad_vm.plugin", "grpc", "nomad_vm.cli"),
    "network": (
        "nomad_vm.driver",
        "nomad_vm.plugin",
        "nomad_vm.vm",
        "nomad_vm.storage",
        "nomad_vm.cli",
        "grpc",
    ),
    # The console server talks to Nomad's HTTP API and to VNC sockets; it knows no driver,
    # plugin protocol or hypervisor (the registry it reads is its own leaf module).
    "console": (
        "nomad_vm.driver",
        "nomad_vm.plugin",
        "nomad_vm.vm",
        "nomad_vm.storage",
        "nomad_vm.cli",
        "grpc",
    ),
    # The control socket's protocol and client: a leaf the CLI imports without the driver.
    "control": (
        "nomad_vm.driver",
        "nomad_vm.plugin",
        "nomad_vm.vm",
        "nomad_vm.storage",
        "nomad_vm.network",
        "nomad_vm.cli",
        "grpc",
    ),
    "cloudinit": (
        "nomad_vm.driver",
        "nomad_vm.plugin",
        "nomad_vm.vm",
        "nomad_vm.storage",
        "nomad_vm.cli",
        "grpc",
    ),
}


# Hypervisor backends: packages under vm/ holding one backend each. The driver reaches them only
# through the interface (vm/hypervisor.py, capabilities.py, request.py) and the registry; no
# backend imports another.
BACKENDS = sorted(
    p.name for p in (SRC / "vm").iterdir() if p.is_dir() and (p / "backend.py").exists()
)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def imported_modules(path: Path) -> set[str]:
    """``imports_of`` plus ``pkg.name`` for every ``from pkg import name`` (``name`` may be a
    module: ``from nomad_vm.vm import qemu`` must count as importing ``nomad_vm.vm.qemu``)."""
    names = imports_of(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_layers(package: str) -> None:
    bad = []
    for path in (SRC / package).rglob("*.py"):
        if "proto" in path.parts:
            continue
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, bad


def test_schema_and_errors_import_nothing_above_them() -> None:
    schema_parts = sorted(str(p.relative_to(SRC)) for p in (SRC / "schema").glob("*.py"))
    # identity.py (the name the plugin is installed under) is a leaf too: the schema's
    # per-name defaults come from it.
    for name in (*schema_parts, "fields.py", "errors.py", "files.py", "identity.py"):
        project = {
            i
            for i in imports_of(SRC / name)
            if i.startswith("nomad_vm") and not i.startswith("nomad_vm.schema")
        }
        allowed = {"nomad_vm.errors", "nomad_vm.fields", "nomad_vm.identity"}
        assert project <= allowed, (name, project)


def test_there_is_a_backend_to_keep_apart() -> None:
    assert "qemu" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_driver_imports_no_backend(backend: str) -> None:
    forbidden = f"nomad_vm.vm.{backend}"
    bad = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in (SRC / "driver").rglob("*.py")
        for name in imported_modules(path)
        if name == forbidden or name.startswith(forbidden + ".")
    ]
    assert not bad, bad


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_do_not_import_each_other(backend: str) -> None:
    others = [f"nomad_vm.vm.{other}" for other in BACKENDS if other != backend]
    bad = [
        f"{path.relative_to(SRC)} imports {name}"
        for path in (SRC / "vm" / backend).rglob("*.py")
        for name in imported_modules(path)
        if any(name == o or name.startswith(o + ".") for o in others)
    ]
    assert not bad, bad


def test_only_the_registry_names_a_backend_outside_its_package() -> None:
    """The rest of vm/ is shared by every backend: it must not lean on one of them."""
    bad = []
    for path in (SRC / "vm").glob("*.py"):
        if path.name == "registry.py":
            continue
        for name in imported_modules(path):
            if any(name.startswith(f"nomad_vm.vm.{b}") for b in BACKENDS):
                bad.append(f"{path.relative_to(SRC)} imports {name}")
    assert not bad, bad
