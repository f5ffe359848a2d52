"""Images from an HTTP server on loopback through a real Nomad agent: Nomad's own `artifact`
block (per allocation, into the task's `local/`) with `image` pointing at it, and the
plugin's image by URL (once per node, into its cache). Both boot the tiny guest, which prints
the disk's first bytes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from nomad_vm.cli.devagent import DevAgent
from nomad_vm.guests.tiny import tiny_cmdline
from nomad_vm.storage.image_store import ImageStore
from nomad_vm.storage.tools import find_qemu_img
from tests.conftest import qemu_processes_under, wait_until
from tests.e2e.conftest import running_agent, wait_alloc
from tests.image_server import ImageServer, image_server

pytestmark = pytest.mark.e2e
MARKER = "ARTIFACT"
RUN = "head -c 8 /dev/vda; echo"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("served")
    raw = root / "disk.raw"
    raw.write_bytes(MARKER.encode() + bytes(16 * 1024 * 1024 - len(MARKER)))
    qcow2 = root / "disk.qcow2"
    subprocess.run(
        [str(find_qemu_img()), "convert", "-q", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    with image_server() as server:
        sha = server.add("/disk.qcow2", qcow2.read_bytes())
        yield server, sha


def job(name: str, guest: Any, image_lines: str, artifact: str = "") -> str:
    cmdline = tiny_cmdline(guest.cmdline, RUN)
    return f"""
job "{name}" {{
  type = "batch"
  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}
    reschedule {{
      attempts  = 0
      unlimited = false
    }}
    task "vm" {{
      driver = "vm"
{artifact}
      config {{
        kernel     = "{guest.vmlinux}"
        initramfs  = "{guest.initramfs}"
        cmdline    = "{cmdline}"
        cloud_init = false
{image_lines}
      }}
      resources {{
        memory = 160
      }}
    }}
  }}
}}
"""


def run_to_end(agent: DevAgent, tmp_path: Path, name: str, hcl: str) -> str:
    path = tmp_path / f"{name}.nomad.hcl"
    path.write_text(hcl)
    agent.nomad("job", "run", "-detach", str(path))
    alloc = wait_alloc(agent, name, {"complete", "failed"}, timeout=240)
    logs = agent.nomad("alloc", "logs", str(alloc["ID"]), "vm", check=False)
    events = [e.get("DisplayMessage", "") for e in alloc["TaskStates"]["vm"]["Events"]]  # type: ignore[index]
    assert alloc["ClientStatus"] == "complete", (events, logs[-2000:])
    assert MARKER in logs, logs[-2000:]
    # Batch allocations end; their VM with them.
    wait_until(lambda: not qemu_processes_under(agent.config.workdir), 30)
    return "\n".join(events)


def test_nomad_artifact_into_local_and_image_pointing_at_it(
    agent: DevAgent, tmp_path: Path, tiny_guest: Any, served: tuple[ImageServer, str]
) -> None:
    server, sha = served
    before = len(server.gets("/disk.qcow2"))
    artifact = f"""      artifact {{
        source      = "{server.url("/disk.qcow2")}"
        destination = "local/"
        options {{
          checksum = "sha256:{sha}"
        }}
      }}"""
    run_to_end(
        agent,
        tmp_path,
        "artifact-image",
        job("artifact-image", tiny_guest, '        image = "local/disk.qcow2"', artifact),
    )
    # Nomad fetched it (go-getter, in the client), not the plugin: its cache stays empty.
    assert len(server.gets("/disk.qcow2")) == before + 1
    assert ImageStore(agent.config.workdir / "plugin-data").entries() == []


def test_image_by_url_through_the_agent(
    tmp_path: Path, tiny_guest: Any, served: tuple[ImageServer, str]
) -> None:
    """The plugin's `image_cache` block as the agent parses it (hclspec), an image by URL,
    and its removal once the task is destroyed (max_unused_age 0s)."""
    server, sha = served
    cache = {"max_unused_age": "0s", "allowed_schemes": ["http"], "read_timeout": 30}
    lines = (
        f'        image          = "{server.url("/disk.qcow2")}"\n'
        f'        image_checksum = "sha256:{sha}"'
    )
    with running_agent([tiny_guest.vmlinux.parent], plugin_extra={"image_cache": cache}) as agent:
        store = ImageStore(agent.config.workdir / "plugin-data")
        events = run_to_end(agent, tmp_path, "url-image", job("url-image", tiny_guest, lines))
        assert "Image downloaded: http://127.0.0.1:" in events, events
        assert "Downloading image http://127.0.0.1:" in events, events
        policy = store.load_policy()
        assert policy is not None and policy.allowed_schemes == ("http",)
        # Nomad destroys the finished task; its lease goes and, unused for 0s, the image too.
        assert wait_until(lambda: store.entries() == [], 60), store.entries()
