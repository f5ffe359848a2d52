"""Which Debian mirror to build the guest from: the one this host's apt already uses.

The guest is installed by debootstrap (which takes one mirror URL) and updated by apt inside the
guest tree (which takes a sources.list). Both come from the host's own apt configuration, so the
build reaches whatever mirror or proxy the host is set up for and nothing is hard-coded.
Both apt formats are read: one-line ``sources.list`` / ``*.list`` and deb822 ``*.sources``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nomad_vm.errors import GuestBuildError

APT_DIR = Path("/etc/apt")
# debootstrap and apt in the guest fetch these URL schemes themselves; others (cdrom:, mirror+)
# need apt methods or media the guest does not have.
_SCHEMES = ("http://", "https://", "file:/")


@dataclass(frozen=True)
class AptSource:
    """One repository: a base URI with the suites and components taken from it."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]


@dataclass(frozen=True)
class GuestSources:
    """The guest's repositories: ``mirror`` for debootstrap, ``lines`` for its sources.list."""

    mirror: str
    lines: tuple[str, ...]

    def sources_list(self) -> str:
        return "".join(f"{line}\n" for line in self.lines)


def parse_one_line(text: str) -> list[AptSource]:
    """``deb [options] URI SUITE [COMPONENT...]`` lines; ``deb-src`` and comments are skipped."""
    sources = []
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):
            # Options may contain spaces ("[ arch=amd64 ]"): drop everything up to the "]".
            closing = next((i for i, word in enumerate(words) if word.endswith("]")), None)
            words = [] if closing is None else words[closing + 1 :]
        if len(words) >= 2:
            sources.append(AptSource(words[0], (words[1],), tuple(words[2:])))
    return sources


def parse_deb822(text: str) -> list[AptSource]:
    """Stanzas of ``Types:``/``URIs:``/``Suites:``/``Components:`` (apt's .sources format)."""
    sources = []
    for stanza in _stanzas(text):
        if "deb" not in stanza.get("types", "").split():
            continue
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(stanza.get("suites", "").split())
        components = tuple(stanza.get("components", "").split())
        sources += [AptSource(uri, suites, components) for uri in stanza.get("uris", "").split()]
    return sources


def _stanzas(text: str) -> list[dict[str, str]]:
    """Field names lower-cased; continuation lines are appended to the previous field."""
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    last = ""
    for line in [*text.splitlines(), ""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, last = {}, ""
        elif line[0] in " \t" and last:
            fields[last] += " " + line.strip()
        else:
            key, _, value = line.partition(":")
            last = key.strip().lower()
            fields[last] = value.strip()
    return stanzas


def host_sources(apt_dir: Path = APT_DIR) -> list[AptSource]:
    """Every ``deb`` repository apt on this host reads, in apt's file order."""
    sources: list[AptSource] = []
    main_list = apt_dir / "sources.list"
    if main_list.is_file():
        sources += parse_one_line(main_list.read_text(errors="replace"))
    parts = apt_dir / "sources.list.d"
    # apt itself reads only these two suffixes; anything else there (backups, files renamed to
    # disable them) must be ignored as apt ignores it.
    for path in sorted(parts.glob("*")) if parts.is_dir() else []:
        if path.suffix == ".list":
            sources += parse_one_line(path.read_text(errors="replace"))
        elif path.suffix == ".sources":
            sources += parse_deb822(path.read_text(errors="replace"))
    return sources


def guest_sources(sources: Iterable[AptSource], suite: str) -> GuestSources:
    """The mirror serving ``suite``'s main component, plus its -updates and -security suites.

    -updates and -security are optional (a host may not list them); the release itself is not.
    """
    usable = [
        source
        for source in sources
        if source.uri.startswith(_SCHEMES)
        and (not source.components or "main" in source.components)
    ]
    mirror = _find(usable, suite)
    if mirror is None:
        raise GuestBuildError(
            f"no apt source for Debian {suite!r} (component main) in /etc/apt/sources.list or "
            f"/etc/apt/sources.list.d/: the guest is installed from the host's own Debian mirror; "
            f"add one, e.g. `deb http://deb.debian.org/debian {suite} main`, and run apt-get update"
        )
    lines = [f"deb {mirror} {suite} main"]
    for extra in (f"{suite}-updates", f"{suite}-security"):
        uri = _find(usable, extra)
        if uri is not None:
            lines.append(f"deb {uri} {extra} main")
    return GuestSources(mirror=mirror, lines=tuple(lines))


def _find(sources: Sequence[AptSource], suite: str) -> str | None:
    for source in sources:
        if suite in source.suites:
            return source.uri.rstrip("/")
    return None
