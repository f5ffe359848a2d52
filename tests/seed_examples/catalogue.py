"""The seed examples in this directory: each file's header says where in which seed its text
comes from and what was substituted, in a form this module reads back.

A file starts with comment lines up to its first blank line:

    # seed: 002 23-61                      the seed file's number and its line range
    # sub: "ORIGINAL" -> "REPLACEMENT": why   one per substitution (JSON strings)

Lines of the body that end in ``# skeleton`` (a job around a fragment) or ``# added`` (a line
the seed lacks, said why in the header) are not the seed's; a line ending in ``# dropped`` is
the seed's, commented out. ``@NAME@`` tokens are filled in by the tests (``render``).
``restored`` undoes all of it, so test_catalogue.py can compare each file with its seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO

HERE = Path(__file__).resolve().parent
# The seed documents, beside the repository (../shared/seeds from its root).
SEED_DIR = REPO.parent / "shared" / "seeds"
_SEED = re.compile(r"^# seed: (\d{3}) (\d+)-(\d+)$")
_SUB = re.compile(r'^# sub: ("(?:[^"\\]|\\.)*") -> ("(?:[^"\\]|\\.)*")(?:: .*)?$')
_TOKEN = re.compile(r"@[A-Z0-9_]+@")
SKELETON, ADDED, DROPPED = "# skeleton", "# added", "# dropped"


@dataclass(frozen=True)
class Example:
    path: Path
    seed: str  # "000", "001", "002"
    first: int  # line numbers in the seed file, inclusive
    last: int
    subs: tuple[tuple[str, str], ...]  # (original, replacement)
    header: str
    body: str

    @property
    def name(self) -> str:
        return self.path.name

    def render(self, values: Mapping[str, object]) -> str:
        """The body with every ``@NAME@`` token replaced by ``values[NAME]``."""

        def fill(match: re.Match[str]) -> str:
            key = match.group(0).strip("@")
            if key not in values:
                raise KeyError(f"{self.name}: no value for {match.group(0)}")
            return str(values[key])

        return _TOKEN.sub(fill, self.header + "\n\n" + self.body)

    def write(self, directory: Path, values: Mapping[str, object]) -> Path:
        path = directory / self.name
        path.write_text(self.render(values))
        return path

    def restored(self) -> list[str]:
        """The body as the seed has it: no skeleton or added lines, dropped lines back,
        substitutions undone; stripped, without blank lines."""
        lines = []
        for line in self.body.splitlines():
            stripped = line.rstrip()
            if stripped.endswith(SKELETON) or stripped.endswith(ADDED):
                continue
            if stripped.endswith(DROPPED):
                stripped = stripped.removesuffix(DROPPED).rstrip().removeprefix("#")
            lines.append(stripped)
        text = "\n".join(lines)
        for original, replacement in self.subs:
            text = text.replace(replacement, original)
        return [line.strip() for line in text.splitlines() if line.strip()]

    def seed_lines(self) -> list[str]:
        (seed_file,) = SEED_DIR.glob(f"{self.seed}_*.txt")
        lines = seed_file.read_text().splitlines()[self.first - 1 : self.last]
        return [line.strip() for line in lines if line.strip()]


def load(path: Path) -> Example:
    text = path.read_text()
    header, _, body = text.partition("\n\n")
    seed = None
    subs = []
    for line in header.splitlines():
        if not line.startswith("#"):
            raise ValueError(f"{path.name}: the header is comment lines up to a blank line")
        if m := _SEED.match(line):
            seed = (m.group(1), int(m.group(2)), int(m.group(3)))
        elif m := _SUB.match(line):
            subs.append((json.loads(m.group(1)), json.loads(m.group(2))))
        elif line.startswith("# sub:"):
            raise ValueError(f"{path.name}: unreadable substitution line {line!r}")
    if seed is None:
        raise ValueError(f"{path.name}: no `# seed: NNN FIRST-LAST` line")
    return Example(path, seed[0], seed[1], seed[2], tuple(subs), header, body)


def all_examples() -> list[Example]:
    return [load(p) for p in sorted(HERE.glob("s0*.hcl"))]


def example(name: str) -> Example:
    return load(HERE / name)
