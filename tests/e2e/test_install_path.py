"""The operator's path, as the README's "Using it with your Nomad agent" tells it.

A wheel of this project goes into a FRESH venv made by Debian's python3; that venv's
`nomad-vm install` writes the wrapper into a fresh plugin_dir and the plugin block into an agent
config dir; a real Nomad agent then runs with an ordinary PATH (no .tools/bin, no venv), so the
plugin finds only what a node's Debian packages put there. examples/demo.nomad.hcl runs as
written and its console must show in `nomad alloc logs`; after `nomad job stop` no QEMU or
virtiofsd may be left under the test's directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from nomad_vm.cli.devagent import DevAgent, DevAgentConfig, InstalledPlugin, remove_tree
from nomad_vm.cli.install import CONFIG_FILE_NAME, wrapper_script
from nomad_vm.cli.paths import nomad_binary
from tests.conftest import REPO, task_state_in, vm_processes_under, wait_until
from tests.e2e.conftest import allocations, run_job, wait_alloc

pytestmark = pytest.mark.e2e

# What a login shell on Debian has: none of the project's tools or venvs.
ORDINARY_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The node's Python (Debian's python3 and python3-venv), not the one the tests run in.
NODE_PYTHON = Path("/usr/bin/python3")
DEMO_JOB = REPO / "examples" / "demo.nomad.hcl"
JOB_NAME = "vm-demo"
TASK = "tiny"
MARKER = "nomad-vm tiny guest: booted"
# Events after which the demo has failed to start (a clean install must start it first time).
FAILURE_EVENTS = {"Driver Failure", "Failed Validation", "Setup Failure", "Not Restarting"}


@dataclass
class CleanInstall:
    root: Path  # everything the test makes is under here: sources, venv, agent, VMs' files
    install: subprocess.CompletedProcess[str]  # what `nomad-vm install` did
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def plugin_dir(self) -> Path:
        return self.root / "plugins"

    @property
    def config_dir(self) -> Path:
        return self.root / "nomad.d"

    @property
    def image_dir(self) -> Path:
        return self.root / "vm-images"

    @property
    def data_dir(self) -> Path:
        return self.root / "plugin-data"


def install_argv(root: Path) -> list[str]:
    """The venv's `nomad-vm install` for the directories under ``root`` (see CleanInstall)."""
    return [
        str(root / "venv" / "bin" / "nomad-vm"),
        "install",
        "--plugin-dir",
        str(root / "plugins"),
        "--config-dir",
        str(root / "nomad.d"),
        "--image-path",
        str(root / "vm-images"),
        "--data-dir",
        str(root / "plugin-data"),
    ]


def as_operator(argv: list[str], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run a command with the operator's ordinary PATH; output captured, never raising."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = ORDINARY_PATH
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def checked(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc


def build_wheel(root: Path) -> Path:
    """A wheel of the working tree, built from a copy so the checkout gets no build/ files."""
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"),
    )
    # The build backend (setuptools) of the tests' own venv: nothing to download.
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    checked(as_operator([*pip_wheel, "-q", "-w", str(root / "dist"), str(source)]))
    (wheel,) = (root / "dist").glob("nomad_vm-*.whl")
    return wheel


@pytest.fixture(scope="module")
def clean_install(tiny_guest) -> Iterator[CleanInstall]:  # type: ignore[no-untyped-def]
    assert NODE_PYTHON.exists(), f"{NODE_PYTHON} missing: the node needs Debian's python3"
    root = Path(tempfile.mkdtemp(prefix="nvi-", dir="/tmp"))
    timings: dict[str, float] = {}
    try:
        started = time.monotonic()
        wheel = build_wheel(root)
        timings["wheel"] = time.monotonic() - started

        started = time.monotonic()
        checked(as_operator([str(NODE_PYTHON), "-m", "venv", str(root / "venv")]))
        timings["venv"] = time.monotonic() - started

        started = time.monotonic()
        checked(as_operator([str(root / "venv" / "bin" / "pip"), "install", "-q", str(wheel)]))
        timings["pip install"] = time.monotonic() - started

        # The README: the tiny guest's two files in a directory the plugin's image_paths name.
        (root / "vm-images").mkdir()
        shutil.copy(tiny_guest.vmlinux, root / "vm-images" / "vmlinux")
        shutil.copy(tiny_guest.initramfs, root / "vm-images" / "initramfs.img")
        (root / "nomad.d").mkdir()

        started = time.monotonic()
        install = as_operator(install_argv(root))
        timings["nomad-vm install"] = time.monotonic() - started
        print("clean install took " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        yield CleanInstall(root, install, timings)
    finally:
        remove_tree(root)


def test_install_writes_the_wrapper_and_the_plugin_block_and_checks_the_host(
    clean_install: CleanInstall,
) -> None:
    result = clean_install.install
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    wrapper = clean_install.plugin_dir / "nomad-driver-vm"
    assert wrapper.read_text() == wrapper_script(clean_install.venv / "bin" / "nomad-driver-vm")
    block = (clean_install.config_dir / CONFIG_FILE_NAME).read_text()
    assert f'image_paths = ["{clean_install.image_dir}"]' in block
    assert f'data_dir    = "{clean_install.data_dir}"' in block
    assert "ok    QEMU" in output
    assert "host is ready" in output
    assert "publish_allocation_metrics" in output

    again = as_operator(install_argv(clean_install.root))
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already up to date") == 2, again.stdout


@contextlib.contextmanager
def agent_on(install: CleanInstall) -> Iterator[DevAgent]:
    """A Nomad agent loading the plugin as installed, with the ordinary PATH. Afterwards the
    demo job is stopped, the agent too, and VM processes still left are reported and ended."""
    agent = DevAgent(
        DevAgentConfig(
            workdir=install.root / "agent",
            nomad_binary=nomad_binary(),
            installed=InstalledPlugin(install.plugin_dir, install.config_dir / CONFIG_FILE_NAME),
            path=ORDINARY_PATH,
        )
    )
    agent.start()
    try:
        yield agent
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.nomad("job", "stop", JOB_NAME, check=False)
        wait_gone(install.root, timeout=30)
        agent.stop()
        leftover = vm_processes_under(install.root)
        for proc in leftover:
            proc.kill()
        if leftover:
            print(f"killed VM processes left behind: {[p.pid for p in leftover]}")
        print(f"agent log: {agent.log_path}")


def test_demo_job_from_the_clean_install_shows_its_console_in_alloc_logs(
    clean_install: CleanInstall,
) -> None:
    assert clean_install.install.returncode == 0, clean_install.install.stdout
    with agent_on(clean_install) as agent:
        driver = agent.wait_driver()["driver"]
        assert isinstance(driver, dict)
        attributes = {k: v for k, v in driver["Attributes"].items() if k.startswith("driver.vm.")}
        # The job as written; its variables point at where the README put the guest.
        images = clean_install.image_dir
        run_job(agent, DEMO_JOB, kernel=images / "vmlinux", initramfs=images / "initramfs.img")
        alloc_id = wait_for_console(agent, attributes)

        agent.nomad("job", "stop", "-detach", JOB_NAME)
        wait_alloc(agent, JOB_NAME, {"complete", "failed"}, timeout=60)
        left = wait_gone(clean_install.root, timeout=30)
        assert not left, f"left after the job stopped: {[(p.pid, p.cmdline()) for p in left]}"
        # The plugin's data_dir holds the VM's runtime dir when the task dir's socket path
        # would be too long (it is here): only the empty run/ may stay.
        data_dir = clean_install.data_dir
        kept = [p for p in task_state_in(data_dir) if p != data_dir / "run"]
        assert not kept, kept
        alloc_dir = agent.config.workdir / "data" / "alloc" / alloc_id / TASK
        assert not list(alloc_dir.glob("nomad-vm*"))


def wait_for_console(agent: DevAgent, attributes: dict[str, str], timeout: float = 180) -> str:
    """The demo alloc's id once `nomad alloc logs` shows the guest's console line; fails at the
    first start failure with the task's events and the driver's attributes."""
    deadline = time.monotonic() + timeout
    logs = ""
    events: list[str] = []
    while time.monotonic() < deadline:
        allocs = allocations(agent, JOB_NAME)
        if allocs:
            alloc_id = str(max(allocs, key=lambda a: int(str(a["CreateIndex"])))["ID"])
            alloc = agent.api(f"/v1/allocation/{alloc_id}")
            assert isinstance(alloc, dict)
            state = (alloc.get("TaskStates") or {}).get(TASK) or {}
            events = [f"{e['Type']}: {e['DisplayMessage']}" for e in state.get("Events") or []]
            logs = agent.nomad("alloc", "logs", alloc_id, TASK, check=False)
            if MARKER in logs:
                return alloc_id
            failed = {e.split(":", 1)[0] for e in events} & FAILURE_EVENTS
            if failed or alloc.get("ClientStatus") == "failed":
                break
        time.sleep(1.0)
    shown = "\n  ".join(events) or "(none)"
    found = "\n  ".join(f"{k} = {v}" for k, v in sorted(attributes.items()))
    raise AssertionError(
        f"the demo VM's console line {MARKER!r} is not in `nomad alloc logs`.\n"
        f"Task events:\n  {shown}\nDriver attributes (agent PATH={ORDINARY_PATH}):\n  {found}\n"
        f"Console so far:\n{logs}"
    )


def wait_gone(root: Path, timeout: float) -> list[psutil.Process]:
    """QEMU and virtiofsd processes under ``root``, once none are left or after ``timeout``."""
    wait_until(lambda: not vm_processes_under(root), timeout, every=0.5)
    return vm_processes_under(root)
