"""Running qemu-img: to its end under ``nomad_vm.storage.limits.Limits`` (a job's image,
CVE-2015-5162), with a timeout and the descriptors it reads inherited under their own numbers.

Failures become ``HypervisorError``; when qemu-img ran and said no, the subclass
``QemuImgError`` carries its stderr so a caller can turn "cannot open this file" into a
user-facing ``ImageError``; a run that hits a limit raises ``QemuImgLimitExceeded``. The
commands themselves (their argv, their answers) are ``storage.qemu_img``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

from nomad_vm.errors import HypervisorError
from nomad_vm.storage.limits import LIMITED_ENV, MIB, Limits, limit_hit, limited_argv

_STDERR_LIMIT = 2000


class QemuImgError(HypervisorError):
    """qemu-img ran and exited non-zero; ``stderr`` is its own explanation (prefix removed)."""

    def __init__(self, message: str, stderr: str) -> None:
        super().__init__(message)
        self.stderr = stderr


class QemuImgLimitExceeded(QemuImgError):
    """qemu-img ran out of the memory (``resource`` "memory") or CPU time ("cpu") its
    ``limits`` allowed."""

    def __init__(self, message: str, stderr: str, resource: str, limits: Limits) -> None:
        super().__init__(message, stderr)
        self.resource = resource
        self.limits = limits

    def explain(self, action: str) -> str:
        """For the user: ``action`` is what qemu-img was doing, e.g. "to read /srv/a.vmdk"."""
        if self.resource == "cpu":
            needed = f"more than {self.limits.cpu_seconds} s of CPU time"
        else:
            needed = f"more than {self.limits.address_space // MIB} MiB of memory"
        return (
            f"qemu-img needed {needed} {action}, far more than a real disk image needs; it may "
            "be crafted to exhaust the host (see CVE-2015-5162), so it is refused. Check where "
            "the image came from, or convert it where that is safe "
            "(`qemu-img convert -O qcow2`) and use the result"
        )


def run_qemu_img(
    argv: list[str],
    timeout: float | None,
    what: str,
    limits: Limits | None,
    fds: Sequence[int] = (),
) -> str:
    """Run qemu-img; its stdout, or a HypervisorError that quotes its stderr."""
    done = run_qemu_img_to_end(argv, timeout, what, limits, fds)
    if done.returncode != 0:
        raise qemu_img_failure(what, done, limits)
    return done.stdout


def run_qemu_img_to_end(
    argv: list[str],
    timeout: float | None,
    what: str,
    limits: Limits | None = None,
    fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[str]:
    """Run qemu-img to its end, whatever its exit status; HypervisorError if it could not run.
    ``fds`` are inherited under their own numbers (prlimit execs qemu-img, keeping them)."""
    env = None if limits is None else {**os.environ, **LIMITED_ENV}
    try:
        return subprocess.run(
            limited_argv(argv, limits),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
            env=env,
            close_fds=True,
            pass_fds=tuple(fds),
        )
    except subprocess.TimeoutExpired:
        # run() has already killed and reaped the child.
        raise HypervisorError(f"{what}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise HypervisorError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None


def qemu_img_failure(
    what: str, done: subprocess.CompletedProcess[str], limits: Limits | None = None
) -> QemuImgError:
    stderr = _clean_stderr(done.stderr)
    status = f"exit status {done.returncode}" if done.returncode > 0 else "killed"
    message = f"{what} failed ({status}): {stderr or '(no message)'}"
    hit = limit_hit(done.returncode, done.stderr) if limits is not None else None
    if hit is not None and limits is not None:
        return QemuImgLimitExceeded(f"{message} (over its {hit} limit)", stderr, hit, limits)
    return QemuImgError(message, stderr)


def _clean_stderr(stderr: str) -> str:
    # qemu-img prefixes its own lines with "qemu-img: "; the caller's message already says who.
    lines = [line.removeprefix("qemu-img: ").rstrip() for line in stderr.strip().splitlines()]
    return "; ".join(line for line in lines if line)[:_STDERR_LIMIT]
