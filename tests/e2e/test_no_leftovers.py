"""Nothing a task started outlives it, through the real agent: a VM on the plugin's bridge with
Nomad's directories shared over virtio-fs is stopped with `nomad job stop`, then the agent is
shut down; no QEMU and no virtiofsd may be left (they were once found running after this)."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import vm_processes_under
from tests.e2e.conftest import private_netns, running_agent, wait_alloc

pytestmark = pytest.mark.e2e

BRIDGE = "nvlbr0"
TAP_PREFIX = "nvl"
PLUGIN_NETWORK = {
    "bridge": BRIDGE,
    "subnet_cidr": "10.98.0.0/24",
    "create_bridge": True,
    "tap_prefix": TAP_PREFIX,
}
JOB = """
job "leftovers" {{
  group "vm" {{
    task "tiny" {{
      driver = "vm"
      kill_timeout = "3s"
      config {{
        kernel    = "{kernel}"
        initramfs = "{initramfs}"
        cmdline   = "console=ttyS0 quiet"
        network_interface {{
          bridge {{}}
        }}
      }}
      resources {{
        cpu    = 500
        memory = 160
      }}
    }}
  }}
}}
"""


@pytest.fixture
def netns() -> Iterator[str]:
    with private_netns((BRIDGE, TAP_PREFIX)) as name:
        yield name


@pytest.mark.parametrize("shutdown", ["after the stop", "during the stop"])
def test_a_stopped_bridged_vm_leaves_nothing_after_agent_shutdown(
    netns: str,
    tiny_guest: Any,
    tmp_path: Path,
    shutdown: str,
) -> None:
    job = tmp_path / "leftovers.nomad.hcl"
    job.write_text(
        textwrap.dedent(JOB.format(kernel=tiny_guest.vmlinux, initramfs=tiny_guest.initramfs))
    )
    with running_agent(
        [tiny_guest.vmlinux.parent], netns=netns, plugin_network=PLUGIN_NETWORK
    ) as agent:
        agent.nomad("job", "run", "-detach", str(job))
        wait_alloc(agent, "leftovers", {"running"})
        workdir = agent.config.workdir
        running = vm_processes_under(workdir)
        names = sorted(p.name() for p in running)
        assert "virtiofsd" in names and any(n.startswith("qemu") for n in names), names
        agent.nomad("job", "stop", "-detach", "leftovers")
        if shutdown == "after the stop":
            wait_alloc(agent, "leftovers", {"complete", "failed"})
        agent.stop()
        left = vm_processes_under(workdir)
        assert not left, [p.cmdline() for p in left]
