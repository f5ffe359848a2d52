"""The Debian guest's root file system tree: debootstrap, then our customisation inside it.

Everything here needs root: debootstrap creates device nodes and runs maintainer scripts in a
chroot, and the customisation script runs apt there. Output of every step is appended to one
build log, which the build publishes next to the image.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from nomad_vm.errors import GuestBuildError

CUSTOMIZE_SCRIPT = "debian-customize.sh"
# Where the script is copied inside the tree while it runs (removed afterwards).
_SCRIPT_IN_TREE = "tmp/nomad-vm-customize.sh"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_DEBOOTSTRAP_HINT = (
    "install it with `apt-get install debootstrap` (scripts/setup-host.sh does); the build "
    "needs root and the host's Debian mirror"
)


def customize_script() -> bytes:
    """The script run inside the tree, shipped as package data next to this module."""
    return importlib.resources.files("nomad_vm.guests").joinpath(CUSTOMIZE_SCRIPT).read_bytes()


def require_root() -> None:
    if os.geteuid() != 0:
        raise GuestBuildError(
            "building the Debian guest needs root (debootstrap creates device nodes and runs "
            "package scripts in a chroot); run `sudo nomad-vm image build debian`"
        )


def run_logged(argv: Sequence[str], log: Path, *, what: str, hint: str) -> None:
    """Run a tool with stdout and stderr appended to ``log``; failures quote the log's tail."""
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(argv)}\n")
        handle.flush()
        try:
            returncode = subprocess.run(
                list(argv), stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT
            ).returncode
        except FileNotFoundError as exc:
            raise GuestBuildError(f"{what}: `{argv[0]}` is not installed; {hint}") from exc
    if returncode != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-5:])
        raise GuestBuildError(
            f"{what}: `{argv[0]}` exited with status {returncode} ({tail}); full log in {log}; "
            f"{hint}"
        )


def debootstrap(
    root: Path, *, suite: str, mirror: str, packages: Sequence[str], cache: Path, log: Path
) -> None:
    """Install ``suite`` minbase plus ``packages`` into ``root``; fail on configure warnings.

    debootstrap does not resolve virtual packages: without python3-cffi-backend, cloud-init is
    left unconfigured. Depending on the version it then exits 0 or 1, but always prints ``W:``
    lines, so those fail the build too. The details are in debootstrap's own log inside the
    tree, which is appended to ``log`` because the tree is deleted after a failure.
    """
    cache.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.exists() else 0
    argv = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}"]
    argv += [f"--cache-dir={cache}", suite, str(root), mirror]
    failure: GuestBuildError | None = None
    try:
        run_logged(argv, log, what=f"debootstrap of Debian {suite}", hint=_DEBOOTSTRAP_HINT)
    except GuestBuildError as exc:
        failure = exc
    with log.open("r+", errors="replace") as handle:
        handle.seek(start)
        warnings = [line.strip() for line in handle if line.startswith("W:")]
        inner = root / "debootstrap" / "debootstrap.log"
        if inner.is_file():  # debootstrap removes it on success
            handle.write(f"\n--- {inner} ---\n{inner.read_text(errors='replace')}")
    if warnings:
        raise GuestBuildError(
            f"debootstrap warned ({' | '.join(dict.fromkeys(warnings))}): packages were left "
            f"unconfigured (a dependency only a virtual package provides must be listed "
            f"explicitly); details in {log}"
        ) from failure
    if failure is not None:
        raise failure
    _prune_cache(root, cache)


def _prune_cache(root: Path, cache: Path) -> None:
    """Keep only the .debs of this install in debootstrap's cache, so it does not grow forever."""
    listing = _chroot_output(
        root, ["dpkg-query", "-W", "-f", "${Package} ${Version} ${Architecture}\\n"]
    )
    keep = set()
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) == 3:  # known but not installed packages have no version
            name, version, arch = fields
            # debootstrap names cached files like apt: the epoch's ":" is URL-encoded.
            keep.add(f"{name}_{version.replace(':', '%3a')}_{arch}.deb")
    for deb in cache.glob("*.deb"):
        if deb.name not in keep:
            deb.unlink(missing_ok=True)


def customize(root: Path, *, sources_list: str, kernel_version: str, log: Path) -> None:
    """Write the guest's apt sources, then run debian-customize.sh inside the tree."""
    (root / "etc/apt/sources.list").write_text(sources_list)
    script = root / _SCRIPT_IN_TREE
    script.write_bytes(customize_script())
    try:
        with mounted_proc(root, log):
            run_logged(
                ["chroot", str(root), "/bin/sh", f"/{_SCRIPT_IN_TREE}", kernel_version],
                log,
                what="customising the Debian guest (apt and configuration inside the tree)",
                hint="the log shows which step failed; the host needs its Debian mirror",
            )
    finally:
        script.unlink(missing_ok=True)
    check_installed(root, log)


def check_installed(root: Path, log: Path) -> None:
    """Every package in the tree must be fully installed ("ii"), whatever the tools reported."""
    listing = _chroot_output(root, ["dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Package}\\n"])
    broken = [line[3:] for line in listing.splitlines() if not line.startswith("ii ")]
    if broken:
        raise GuestBuildError(
            f"packages not fully installed in the Debian guest: {', '.join(broken[:10])}; see "
            f"{log} for why (missing dependency, failed maintainer script)"
        )


def installed_versions(root: Path, packages: Sequence[str]) -> dict[str, str]:
    """Versions dpkg records in the tree, for the manifest."""
    listing = _chroot_output(
        root, ["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *packages]
    )
    pairs = (line.split(" ", 1) for line in listing.splitlines() if " " in line)
    return {name: version for name, version in pairs if version}


def _chroot_output(root: Path, argv: Sequence[str]) -> str:
    try:
        return subprocess.run(
            ["chroot", str(root), *argv], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise GuestBuildError(f"`{' '.join(argv)}` in the guest tree failed: {detail}") from exc


@contextmanager
def mounted_proc(root: Path, log: Path) -> Iterator[None]:
    """/proc inside the tree while package scripts run (some read it); always unmounted."""
    target = root / "proc"
    run_logged(
        ["mount", "-t", "proc", "nomad-vm-proc", str(target)],
        log,
        what="mounting /proc in the guest tree",
        hint="the build must run as root on a host that allows mounts",
    )
    try:
        yield
    finally:
        unmount_under(target)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
            point = _OCTAL_ESCAPE.sub(lambda match: chr(int(match[1], 8)), line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_under(path: Path) -> None:
    """Unmount everything at or below ``path``; lazily when busy, so the tree can be removed."""
    for point in mounts_under(path):
        result = subprocess.run(["umount", str(point)], capture_output=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def remove_tree(path: Path) -> None:
    """Delete a build directory, but never through a mount (a leftover bind of /proc or a
    loop-mounted image from a killed build): removing files there would reach outside it."""
    unmount_under(path)
    remaining = mounts_under(path)
    if remaining:
        raise GuestBuildError(
            f"cannot remove {path}: {', '.join(map(str, remaining))} still mounted; unmount "
            f"them (umount -l) and build again"
        )
    shutil.rmtree(path, ignore_errors=True)
