"""`nomad-vm demo`: a dev agent on loopback running examples/demo.nomad.hcl, left running."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from nomad_vm.cli.devagent import DevAgent, DevAgentConfig, remove_tree
from nomad_vm.cli.paths import (
    NotPrivateError,
    demo_dir,
    driver_executable,
    guest_cache_dir,
    nomad_binary,
    private_dir,
)
from nomad_vm.guests.tiny import build_tiny

JOB_NAME = "vm-demo"
JOB_FILE = Path(__file__).resolve().parents[3] / "examples" / "demo.nomad.hcl"
MARKER = "nomad-vm tiny guest: booted"


def _pidfile() -> Path:
    return demo_dir() / "agent.pid"


def _running_pid() -> int | None:
    try:
        pid = int(_pidfile().read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def run_demo() -> int:
    try:
        workdir = private_dir(demo_dir())
    except NotPrivateError as exc:
        print(f"refusing to run the demo: {exc}")
        return 1
    if _running_pid():
        print(
            f"a demo agent is already running (pid {_running_pid()}); stop it with `make demo-stop`"
        )
        return 1
    print("==> building (or reusing) the tiny test guest")
    guest = build_tiny(guest_cache_dir())
    agent = DevAgent(
        DevAgentConfig(
            workdir=workdir,
            nomad_binary=nomad_binary(),
            driver_executable=driver_executable(),
            image_paths=[guest.vmlinux.parent],
            log_level="INFO",
        )
    )
    print(f"==> starting a Nomad dev agent on {agent.address} (log: {agent.log_path})")
    agent.start()
    assert agent.process is not None
    _pidfile().write_text(str(agent.process.pid))
    agent.wait_driver()
    print("==> driver vm is detected and healthy; running", JOB_FILE)
    kernel, initramfs = f"kernel={guest.vmlinux}", f"initramfs={guest.initramfs}"
    agent.nomad("job", "run", "-detach", "-var", kernel, "-var", initramfs, str(JOB_FILE))
    logs = _wait_for_console(agent)
    print(agent.nomad("job", "status", JOB_NAME))
    print("==> the guest console, from `nomad alloc logs`:")
    print(logs)
    print(f"""==> the demo keeps running. Try:
    export NOMAD_ADDR={agent.address}
    nomad job status {JOB_NAME}
    nomad alloc logs -f -job {JOB_NAME}
    nomad alloc status -stats $(nomad job allocs -t '{{{{(index . 0).ID}}}}' {JOB_NAME})
Stop it (VM, agent and files) with: make demo-stop""")
    return 0


def _wait_for_console(agent: DevAgent, timeout: float = 180.0) -> str:
    deadline = time.monotonic() + timeout
    logs = ""
    while time.monotonic() < deadline:
        logs = agent.nomad("alloc", "logs", "-job", JOB_NAME, check=False)
        if MARKER in logs:
            return logs
        time.sleep(1.0)
    raise TimeoutError(f"the guest console did not show {MARKER!r} within {timeout:.0f}s:\n{logs}")


def stop_demo() -> int:
    """Stop the job (so the driver stops the VM), wait for that, then stop the agent."""
    try:
        # The pid file is trusted (its process group is signalled) only in a private dir.
        private_dir(demo_dir(), create=False)
    except NotPrivateError as exc:
        print(f"no demo to stop: {exc}")
        return 1 if os.path.lexists(demo_dir()) else 0
    pid = _running_pid()
    if pid is None:
        print("no demo agent is running")
        return 0
    port = (demo_dir() / "agent.hcl").read_text().split("http =", 1)[1].split()[0]
    env = {**os.environ, "NOMAD_ADDR": f"http://127.0.0.1:{port}"}
    subprocess.run(
        [str(nomad_binary()), "job", "stop", "-detach", JOB_NAME],
        env=env,
        check=False,
        capture_output=True,
    )
    _wait_allocs_stopped(f"http://127.0.0.1:{port}")
    os.killpg(pid, signal.SIGINT)
    for _ in range(60):
        if _running_pid() is None:
            break
        time.sleep(0.5)
    else:
        os.killpg(pid, signal.SIGKILL)
    remove_tree(demo_dir())
    print(f"demo stopped: the job, its VM, the agent and {demo_dir()} are gone")
    return 0


def _wait_allocs_stopped(address: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            allocs = httpx.get(f"{address}/v1/job/{JOB_NAME}/allocations", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return
        if not any(a["ClientStatus"] in ("pending", "running") for a in allocs):
            return
        time.sleep(0.5)
    print(f"warning: the demo allocation did not stop within {timeout:.0f}s")
