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
    "cloudinit": (
        "nomad_vm.driver",
        "nomad_vm.plugin",
        "nomad_vm.vm",
        "nomad_vm.storage",
        "nomad_vm.cli",
        "grpc",
    ),
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
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
    for name in ("schema.py", "fields.py", "errors.py", "files.py"):
        project = {i for i in imports_of(SRC / name) if i.startswith("nomad_vm")}
        assert project <= {"nomad_vm.errors", "nomad_vm.fields"}, (name, project)
