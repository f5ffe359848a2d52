"""A script check in a VM task's Consul service, run by a real Nomad agent with a real Consul.

Nomad's own service provider does not run script checks; with `provider = "consul"` the Nomad
client runs each one itself on its interval, through the driver's ExecTask (so in the guest, via
qemu-guest-agent), and reports the result to Consul as a TTL check: exit 0 is passing, 1 warning,
anything else critical, with the command's stdout as the check's output. Until the guest agent
answers, ExecTask fails and the checks are critical with the RPC error as their output.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nomad_vm.cli.devagent import DevAgent
from tests.conftest import vm_processes_under
from tests.e2e.conftest import (
    DEBIAN_VARIABLES,
    ConsulAgent,
    run_debian_job,
    running_agent,
    running_consul,
    wait_alloc,
)

pytestmark = pytest.mark.e2e

JOB_NAME = "vm-script-check"
SERVICE = "vm-script"
JOB = f"""
job "{JOB_NAME}" {{
  group "vm" {{
    task "vm" {{
      driver = "vm"

      config {{
        image     = var.image
        kernel    = var.kernel
        initramfs = var.initramfs
        cmdline   = var.cmdline
        hostname  = "script-check-1"
      }}

      service {{
        provider = "consul"
        name     = "{SERVICE}"

        check {{
          name     = "guest-ok"
          type     = "script"
          command  = "/bin/sh"
          args     = ["-c", "test -f /etc/hostname && echo guest-ok"]
          interval = "5s"
          timeout  = "10s"
        }}

        check {{
          name     = "guest-warn"
          type     = "script"
          command  = "/bin/sh"
          args     = ["-c", "echo guest-warn; exit 1"]
          interval = "5s"
          timeout  = "10s"
        }}

        check {{
          name     = "guest-fail"
          type     = "script"
          command  = "/bin/sh"
          args     = ["-c", "echo guest-fail; echo not-in-output >&2; exit 2"]
          interval = "5s"
          timeout  = "10s"
        }}
      }}

      resources {{
        cpu    = 1000
        memory = 1024
      }}

      kill_timeout = "30s"
    }}
  }}
}}
"""
# What each check must settle on once the guest agent answers: (status, stdout of the command).
WANTED = {
    "guest-ok": ("passing", "guest-ok\n"),
    "guest-warn": ("warning", "guest-warn\n"),
    "guest-fail": ("critical", "guest-fail\n"),
}


def service_checks(consul: ConsulAgent) -> dict[str, tuple[str, str]]:
    """Check name -> (status, output) of the service's checks, as Consul's health API has them."""
    checks = consul.api(f"/v1/health/checks/{SERVICE}")
    assert isinstance(checks, list)
    return {str(c["Name"]): (str(c["Status"]), str(c["Output"])) for c in checks}


def wait_consul_fingerprint(agent: DevAgent, timeout: float = 60.0) -> str:
    """Jobs with Consul services are constrained on ``attr.consul.version``: wait for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = agent.api("/v1/nodes")
        assert isinstance(nodes, list) and nodes
        node = agent.api(f"/v1/node/{nodes[0]['ID']}")
        assert isinstance(node, dict)
        version = node["Attributes"].get("consul.version")
        if version:
            return str(version)
        time.sleep(0.5)
    raise TimeoutError(f"the node has no consul.version attribute after {timeout:.0f}s")


def test_script_check_runs_in_the_guest(debian_guest, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with (
        running_consul() as consul,
        running_agent([debian_guest.disk.parent], consul_address=consul.address) as agent,
    ):
        print(f"consul version seen by nomad: {wait_consul_fingerprint(agent)}")
        job_file = tmp_path / "script-check.nomad.hcl"
        job_file.write_text(DEBIAN_VARIABLES + JOB)
        run_debian_job(agent, job_file, debian_guest)
        wait_alloc(agent, JOB_NAME, {"running"})
        started = time.monotonic()

        # Before the guest agent answers the checks are critical (ExecTask fails); then each
        # settles on its command's result. Keep every distinct state seen, for the failure
        # message and the test log.
        seen: list[tuple[float, dict[str, tuple[str, str]]]] = []
        checks: dict[str, tuple[str, str]] = {}
        while time.monotonic() - started < 300:
            checks = service_checks(consul)
            if not seen or seen[-1][1] != checks:
                seen.append((round(time.monotonic() - started, 1), checks))
                print(f"{seen[-1][0]:6.1f}s {checks}")
            if all(checks.get(name) == want for name, want in WANTED.items()):
                break
            time.sleep(1)
        else:
            pytest.fail(f"the script checks never settled as {WANTED}; states seen: {seen}")

        # The Nomad agent registered the service in Consul with exactly these three checks, all
        # of them TTL checks it updates itself (Consul does not run the scripts).
        raw = consul.api(f"/v1/health/checks/{SERVICE}")
        assert isinstance(raw, list)
        assert sorted(c["Name"] for c in raw) == sorted(WANTED), raw
        assert all(c["Type"] == "ttl" for c in raw), raw

        # The checks stay settled on later runs (not a one-off).
        time.sleep(12)
        assert service_checks(consul) == {n: w for n, w in WANTED.items()}

        agent.nomad("job", "stop", "-detach", JOB_NAME)
        wait_alloc(agent, JOB_NAME, {"complete"}, timeout=120)
        deadline = time.monotonic() + 60
        while service_checks(consul):
            assert time.monotonic() < deadline, "the service's checks stayed in Consul"
            time.sleep(1)
        left = vm_processes_under(agent.config.workdir)
        assert not left, f"VM processes outlived the stopped job: {[p.pid for p in left]}"
    assert consul.process.poll() is not None, "the consul agent is still running"
    assert agent.process is not None and agent.process.poll() is not None
