"""The operator's command on this host: doctor, docs, image names."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO
from tests.netns import ip, isolated_namespaces

NOMAD_VM = str(REPO / ".venv" / "bin" / "nomad-vm")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NOMAD_VM, *args], capture_output=True, text=True, timeout=120)


def test_doctor_reports_qemu_kvm_and_the_accelerator_choice() -> None:
    proc = run("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "QEMU 7." in proc.stdout or "QEMU " in proc.stdout
    assert "KVM " in proc.stdout
    assert "accelerator 'auto' -> " in proc.stdout
    assert proc.stdout.rstrip().endswith("host is ready")


def test_doctor_fails_clearly_without_qemu() -> None:
    proc = run("doctor", "--qemu-binary", "/nonexistent/qemu")
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "/nonexistent/qemu" in proc.stdout


def test_doctor_refuses_kvm_where_it_does_not_work() -> None:
    from nomad_vm.vm.accel import probe_kvm

    proc = run("doctor", "--accelerator", "kvm")
    assert proc.returncode == (0 if probe_kvm().usable else 1)


def test_unknown_image_name() -> None:
    proc = run("image", "build", "windows")
    assert proc.returncode == 2
    assert "available: tiny, debian" in proc.stderr


def test_docs_check_passes_on_the_checked_in_reference() -> None:
    proc = subprocess.run(
        [NOMAD_VM, "docs", "--check"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0, proc.stderr


def test_doctor_checks_the_plugins_bridge() -> None:
    """Run inside a test namespace with (and then without) the bridge."""
    with isolated_namespaces(("nvtbr",)) as spaces:
        ns = spaces.new()

        def doctor() -> subprocess.CompletedProcess[str]:
            argv = ["ip", "netns", "exec", ns, NOMAD_VM, "doctor", "--bridge", "nvtbrd"]
            return subprocess.run(argv, capture_output=True, text=True, timeout=120)

        missing = doctor()
        assert missing.returncode == 1
        assert "FAIL  bridge nvtbrd does not exist" in missing.stdout, missing.stdout
        ip("-n", ns, "link", "add", "nvtbrd", "type", "bridge")
        ip("-n", ns, "addr", "add", "10.94.0.1/24", "dev", "nvtbrd")
        present = doctor()
        assert present.returncode == 0, present.stdout
        assert "ok    bridge nvtbrd DOWN, 10.94.0.1/24" in present.stdout, present.stdout
        assert "ok    DHCP mode possible: dnsmasq at /usr/sbin/dnsmasq" in present.stdout
