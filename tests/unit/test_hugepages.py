"""The huge page check against a /proc/meminfo written by the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from nomad_vm.errors import VMRequestError
from nomad_vm.vm.hugepages import check_hugepages, hugepage_pool


def meminfo(tmp_path: Path, free: int, rsvd: int = 0, size: int = 2048) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(
        "MemTotal:       24684000 kB\n"
        f"HugePages_Total:     {free + 4}\nHugePages_Free:      {free}\n"
        f"HugePages_Rsvd:      {rsvd}\nHugePages_Surp:        0\nHugepagesize:       {size} kB\n"
    )
    return path


def test_free_pages_not_reserved_by_others_count(tmp_path: Path) -> None:
    assert hugepage_pool(meminfo(tmp_path, free=100, rsvd=30)) == (2048, 70)


def test_a_guest_that_fits_passes(tmp_path: Path) -> None:
    check_hugepages(256, meminfo(tmp_path, free=128))


def test_too_few_free_pages_names_the_option_and_the_numbers(tmp_path: Path) -> None:
    with pytest.raises(VMRequestError) as caught:
        check_hugepages(256, meminfo(tmp_path, free=100, rsvd=10))
    assert caught.value.option == "hugepages"
    assert "need 128 free huge pages of 2048 kB" in caught.value.reason
    assert "has 90 free" in caught.value.reason and "vm.nr_hugepages" in caught.value.reason


def test_memory_not_a_multiple_of_the_page_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VMRequestError) as caught:
        check_hugepages(1500, meminfo(tmp_path, free=10, size=1048576))
    assert "not a multiple" in caught.value.reason
