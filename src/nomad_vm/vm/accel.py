"""Choose QEMU's accelerator (KVM or TCG) from the configuration and an honest KVM probe.

/dev/kvm being present and openable is not evidence that KVM works: see
``nomad_vm.vm.kvm_probe``, which runs guest code and times it. The probe runs in a child
process because KVM_RUN on a broken KVM can hang in the kernel; the driver must never hang with
it. Its result is cached per process: it cannot change while the host runs, and the fingerprint
asks for it every few seconds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from nomad_vm.errors import VMRequestError
from nomad_vm.schema import ACCELERATORS

PROBE_MODULE = "nomad_vm.vm.kvm_probe"
DEFAULT_PROBE_TIMEOUT = 5.0
# On top of the probe's own KVM_RUN budget: interpreter start-up and VM teardown. The probe
# reports a hung KVM_RUN itself; this margin only matters if the child is stuck elsewhere.
PROBE_PROCESS_GRACE = 2.0
# After killing a stuck child, wait this long for it to go; a task stuck in the kernel may not.
_REAP_TIMEOUT = 1.0
_STDERR_TAIL = 400

AcceleratorName = Literal["kvm", "tcg"]


@dataclass(frozen=True)
class KvmStatus:
    """Whether KVM can run guests here, and a sentence saying what the probe saw."""

    usable: bool
    reason: str


@dataclass(frozen=True)
class AcceleratorChoice:
    """The accelerator to pass to QEMU (``-accel NAME``), and why it was chosen."""

    name: AcceleratorName
    reason: str


@functools.cache
def probe_kvm(timeout: float = DEFAULT_PROBE_TIMEOUT) -> KvmStatus:
    """Probe KVM once per process (per timeout value); ``clear_kvm_probe_cache`` forgets it."""
    argv = [sys.executable, "-P", "-m", PROBE_MODULE, "--timeout", repr(timeout)]
    return run_probe_process(argv, timeout + PROBE_PROCESS_GRACE)


def clear_kvm_probe_cache() -> None:
    """Forget the cached probe result (tests; or after the operator fixed /dev/kvm)."""
    probe_kvm.cache_clear()


def run_probe_process(argv: Sequence[str], deadline_seconds: float) -> KvmStatus:
    """Run a probe command that prints one JSON line; any failure means "not usable".

    ``-P`` in the default argv keeps the current directory off sys.path, so a stray
    ``nomad_vm`` directory where the agent runs cannot stand in for the installed package.
    """
    try:
        child = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        return KvmStatus(False, f"could not start the KVM probe {argv[0]}: {exc.strerror}")
    try:
        stdout, stderr = child.communicate(timeout=deadline_seconds)
    except subprocess.TimeoutExpired:
        child.kill()
        # A child stuck in the kernel may outlive SIGKILL for a while: Popen reaps it later,
        # and the driver must not wait on it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.communicate(timeout=_REAP_TIMEOUT)
        return KvmStatus(
            False,
            f"the KVM probe did not finish within {deadline_seconds:g} s "
            "(stuck in the kernel, most likely in KVM_RUN)",
        )
    return parse_probe_output(child.returncode, stdout, stderr)


def parse_probe_output(returncode: int, stdout: str, stderr: str) -> KvmStatus:
    """Read the probe's last stdout line; anything unexpected is reported, never trusted."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if (
        returncode == 0
        and isinstance(result, dict)
        and isinstance(result.get("usable"), bool)
        and isinstance(result.get("reason"), str)
        and result["reason"]
    ):
        return KvmStatus(result["usable"], result["reason"])
    detail = stderr.strip()[-_STDERR_TAIL:] or stdout.strip()[-_STDERR_TAIL:] or "no output"
    return KvmStatus(
        False, f"the KVM probe exited with status {returncode} and no valid result: {detail}"
    )


def choose_accelerator(setting: str, kvm: KvmStatus) -> AcceleratorChoice:
    """Map the ``accelerator`` setting and the probe result to QEMU's accelerator.

    ``auto`` falls back to TCG quietly (the reason says why); an explicit ``kvm`` that cannot be
    honoured is an error (VMRequestError) rather than a silent slowdown.
    """
    if setting == "tcg":
        return AcceleratorChoice("tcg", 'accelerator = "tcg" in the configuration')
    if setting == "kvm":
        if kvm.usable:
            return AcceleratorChoice("kvm", f'accelerator = "kvm" and KVM is usable: {kvm.reason}')
        raise VMRequestError(
            "accelerator",
            f'"kvm" was requested but KVM is not usable on this host: {kvm.reason}; '
            'set accelerator to "auto" (falls back to TCG) or "tcg"',
        )
    if setting == "auto":
        if kvm.usable:
            return AcceleratorChoice("kvm", f"KVM is usable: {kvm.reason}")
        return AcceleratorChoice(
            "tcg", f"KVM not usable: {kvm.reason}; using TCG (software emulation)"
        )
    allowed = ", ".join(f'"{value}"' for value in ACCELERATORS)
    raise VMRequestError("accelerator", f"unknown value {setting!r}; allowed values: {allowed}")
