"""Integration fixtures: the real plugin process, started the way Nomad starts it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.plugin.launcher import PluginProcess

# The real Ceph cluster, one per test session (started only by tests that ask for it).
from tests.ceph_cluster import ceph_cluster  # noqa: F401
from tests.integration.pluginkit import DRIVER


@pytest.fixture
def plugin(short_tmp: Path) -> Iterator[PluginProcess]:
    proc = PluginProcess([str(DRIVER)])
    proc.start(short_tmp / "plugin.stderr")
    yield proc
    proc.kill()


@pytest.fixture(scope="session")
def busybox(tiny_guest: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """busybox (for its DHCP client, see tests/dhcp_client.py)."""
    from tests.dhcp_client import extract_busybox

    return extract_busybox(tmp_path_factory.mktemp("busybox"))
