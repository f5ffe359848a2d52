"""Each example file is its seed's text: with the header's substitutions undone and the
skeleton and added lines left out, it equals the seed's lines (indentation aside); and the
README maps every file to its test. Needs no agent."""

from __future__ import annotations

import re

import pytest

from tests.seed_examples.catalogue import HERE, SEED_DIR, Example, all_examples

EXAMPLES = all_examples()


@pytest.mark.skipif(not SEED_DIR.is_dir(), reason=f"the seed documents are not at {SEED_DIR}")
@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda e: e.name)
def test_the_file_is_the_seed_text_with_only_the_stated_substitutions(ex: Example) -> None:
    for _original, replacement in ex.subs:
        assert replacement in ex.body, f"{ex.name}: substitution {replacement!r} unused"
    assert ex.restored() == ex.seed_lines()


def test_the_readme_maps_every_file_to_a_test() -> None:
    readme = (HERE / "README.md").read_text()
    named = set(re.findall(r"`(s0\d\d_l\d{3}_[a-z0-9_]+(?:\.nomad)?\.hcl)`", readme))
    files = {e.name for e in EXAMPLES}
    assert named == files, (sorted(files - named), sorted(named - files))
    tests = set(re.findall(r"`(test_[a-z0-9_]+\.py)`", readme))
    for test in tests:
        assert (HERE / test).is_file() or (HERE.parent / "integration" / test).is_file(), test
