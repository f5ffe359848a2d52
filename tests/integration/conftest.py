"""Integration fixtures: the real plugin process, started the way Nomad starts it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nomad_vm.plugin.launcher import PluginProcess
from tests.integration.pluginkit import DRIVER


@pytest.fixture
def plugin(short_tmp: Path) -> Iterator[PluginProcess]:
    proc = PluginProcess([str(DRIVER)])
    proc.start(short_tmp / "plugin.stderr")
    yield proc
    proc.kill()
