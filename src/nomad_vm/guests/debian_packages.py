"""Fetch and unpack Debian packages without installing them on the host.

The test guests are assembled from Debian's own binaries (kernel, busybox). We ask apt for the
candidate version, ``apt-get download`` the .deb into a cache directory and ``dpkg -x`` it into a
scratch directory: nothing is installed and no root is needed beyond what apt itself requires.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import GuestBuildError

# Debian's "always the current kernel" metapackage: its Depends names the versioned image package.
KERNEL_METAPACKAGE = "linux-image-amd64"

_APT_HINT = (
    "this needs a Debian-based host with apt; run `apt-get update` (as root) and check that "
    "the package exists for this release"
)


@dataclass(frozen=True)
class DebPackage:
    """A binary package pinned to one version, e.g. ``busybox-static`` ``1:1.35.0-4+deb12u1+b1``."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        """The ``name=version`` form apt-get accepts, so we fetch exactly what we keyed on."""
        return f"{self.name}={self.version}"


@dataclass(frozen=True)
class DebUri:
    """One line of ``apt-get download --print-uris``: where apt would fetch the file from."""

    url: str
    filename: str
    size: int
    checksum: str  # "SHA256:hex" (or whatever apt reports; empty if none)


def run_tool(
    argv: Sequence[str], *, what: str, hint: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a host tool, turning every failure into a GuestBuildError that says what to do."""
    try:
        return subprocess.run(list(argv), cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise GuestBuildError(f"{what}: `{argv[0]}` is not installed; {hint}") from exc
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip().splitlines()
        tail = " | ".join(detail[-3:]) if detail else "no output"
        raise GuestBuildError(
            f"{what}: `{' '.join(argv)}` exited with status {exc.returncode} ({tail}); {hint}"
        ) from exc


def parse_control(text: str) -> list[dict[str, str]]:
    """Parse Debian control-file output (``apt-cache show``) into one dict per stanza.

    Continuation lines (long descriptions) are dropped: we only need single-line fields.
    """
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if fields:
                stanzas.append(fields)
                fields = {}
            continue
        if line[0] in " \t":
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return stanzas


def candidates(packages: Sequence[str]) -> dict[str, dict[str, str]]:
    """Control fields of the versions apt would install, keyed by package name.

    One apt-cache call for all packages: on hosts configured without apt's binary cache (common
    in containers) every call re-parses all package lists, which takes seconds.
    """
    result = run_tool(
        ["apt-cache", "show", "--no-all-versions", *packages],
        what=f"looking up Debian packages {', '.join(packages)}",
        hint=_APT_HINT,
    )
    found = {
        stanza["Package"]: stanza
        for stanza in parse_control(result.stdout)
        if "Package" in stanza and "Version" in stanza
    }
    missing = [package for package in packages if package not in found]
    if missing:
        raise GuestBuildError(f"apt-cache show printed no version for {missing}; {_APT_HINT}")
    return found


def candidate_package(package: str) -> DebPackage:
    return DebPackage(package, candidates([package])[package]["Version"])


_DEPENDENCY = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9+.-]*)(?::\S+)?\s*(?:\((?P<op>[<>=]+)\s*(?P<version>[^)\s]+)\s*\))?"
)


def metapackage_target(depends: str, prefix: str) -> DebPackage | str:
    """The first dependency in a ``Depends:`` value whose name starts with ``prefix``.

    ``linux-image-amd64`` depends on ``linux-image-6.1.0-56-amd64 (= 6.1.192-2)``: with an exact
    ``=`` constraint the pinned package is returned, otherwise just the name.
    """
    for clause in depends.split(","):
        for alternative in clause.split("|"):
            match = _DEPENDENCY.match(alternative.strip())
            if match and match["name"].startswith(prefix):
                if match["op"] == "=":
                    return DebPackage(match["name"], match["version"])
                return match["name"]
    raise GuestBuildError(f"no dependency starting with {prefix!r} in Depends: {depends!r}")


def kernel_package(metapackage: dict[str, str]) -> DebPackage:
    """The versioned kernel image package Debian's ``linux-image-amd64`` points at.

    ``metapackage`` holds the metapackage's control fields (see :func:`candidates`).
    """
    target = metapackage_target(metapackage.get("Depends", ""), "linux-image-")
    return target if isinstance(target, DebPackage) else candidate_package(target)


def kernel_release(package: DebPackage) -> str:
    """``linux-image-6.1.0-56-amd64`` -> ``6.1.0-56-amd64`` (``uname -r``, the modules dir)."""
    release = package.name.removeprefix("linux-image-")
    if release == package.name or not release:
        raise GuestBuildError(f"{package.name} does not look like a linux-image-<release> package")
    return release


_URI_LINE = re.compile(r"^'(?P<url>[^']+)'\s+(?P<file>\S+)\s+(?P<size>\d+)\s*(?P<sum>\S*)")


def parse_print_uris(text: str) -> list[DebUri]:
    uris = []
    for line in text.splitlines():
        match = _URI_LINE.match(line.strip())
        if match:
            uris.append(DebUri(match["url"], match["file"], int(match["size"]), match["sum"]))
    return uris


def _matches(path: Path, uri: DebUri) -> bool:
    """True if a cached .deb is the exact file apt would download (size, then checksum)."""
    if not path.is_file() or path.stat().st_size != uri.size:
        return False
    algo, _, expected = uri.checksum.partition(":")
    if not expected or algo.lower() not in hashlib.algorithms_available:
        return True  # apt gave us no checksum we can check: the size match is all we have
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, algo.lower()).hexdigest() == expected.lower()


def download(packages: Sequence[DebPackage], debs_dir: Path) -> list[Path]:
    """Return the paths of the packages' .debs in ``debs_dir``, downloading those absent.

    Older versions of the same packages are removed afterwards, so a long-lived cache holds
    one kernel .deb (about 70 MB), not one per Debian point release.
    """
    debs_dir.mkdir(parents=True, exist_ok=True)
    specs = [package.spec for package in packages]
    # apt works in a private empty directory: --print-uris silently omits files already present
    # in its working directory, and a download there is never seen half-written by others.
    with tempfile.TemporaryDirectory(dir=debs_dir, prefix=".download-") as scratch_name:
        scratch = Path(scratch_name)
        listing = run_tool(
            ["apt-get", "download", "--print-uris", *specs],
            what=f"asking apt where to get {', '.join(specs)}",
            hint=_APT_HINT,
            cwd=scratch,
        )
        uris = {uri.filename.split("_", 1)[0]: uri for uri in parse_print_uris(listing.stdout)}
        missing = [package.name for package in packages if package.name not in uris]
        if missing:
            raise GuestBuildError(f"apt-get download --print-uris listed no file for {missing}")
        wanted = [uris[package.name] for package in packages]
        absent = [
            (package, uri)
            for package, uri in zip(packages, wanted, strict=True)
            if not _matches(debs_dir / uri.filename, uri)
        ]
        if absent:
            _fetch(absent, scratch, debs_dir)
    for package, uri in zip(packages, wanted, strict=True):
        _prune_other_versions(debs_dir, package.name, keep=debs_dir / uri.filename)
    return [debs_dir / uri.filename for uri in wanted]


def _fetch(items: Sequence[tuple[DebPackage, DebUri]], scratch: Path, debs_dir: Path) -> None:
    specs = [package.spec for package, _ in items]
    run_tool(
        ["apt-get", "download", "-q", *specs],
        what="downloading " + ", ".join(specs),
        hint=_APT_HINT + "; the host needs access to its Debian mirror",
        cwd=scratch,
    )
    for _, uri in items:
        fetched = scratch / uri.filename
        if not _matches(fetched, uri):
            raise GuestBuildError(f"downloaded {uri.filename} does not match apt's checksum")
        os.replace(fetched, debs_dir / uri.filename)


def _prune_other_versions(debs_dir: Path, name: str, keep: Path) -> None:
    for old in debs_dir.glob(f"{name}_*.deb"):
        if old != keep:
            old.unlink(missing_ok=True)


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's file system tree into ``dest`` (``dpkg -x``; no maintainer scripts run)."""
    dest.mkdir(parents=True, exist_ok=True)
    run_tool(
        ["dpkg", "-x", str(deb), str(dest)],
        what=f"unpacking {deb.name}",
        hint="the file may be corrupt: delete it from the download cache and build again",
    )
