"""The image download (``storage.download``) against a real HTTP server on loopback: checksum
mismatch, 404, a stalled server, an interrupted download resumed with a Range request, the
size limit."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from nomad_vm.storage.download import ChecksumMismatch, DownloadError, Limits, download
from tests.image_server import image_server

LIMITS = Limits(max_size=64 * 1024 * 1024, connect_timeout=5, read_timeout=5)
DATA = bytes(range(256)) * 4096 * 3  # 3 MiB


def fetch(url: str, partial: Path, sha: str | None, limits: Limits = LIMITS) -> str:
    seen: list[tuple[int, int | None]] = []
    digest = asyncio.run(download(url, partial, sha, limits, lambda d, t: seen.append((d, t))))
    assert seen and seen[-1][0] == partial.stat().st_size
    return digest


def test_a_download_verifies_and_reports_progress(tmp_path: Path) -> None:
    with image_server() as server:
        sha = server.add("/disk.img", DATA)
        partial = tmp_path / "part"
        assert fetch(server.url("/disk.img"), partial, sha) == sha
        assert partial.read_bytes() == DATA
        assert [r.range for r in server.gets("/disk.img")] == [None]


def test_a_checksum_mismatch_removes_the_partial_file(tmp_path: Path) -> None:
    with image_server() as server:
        server.add("/disk.img", DATA)
        partial = tmp_path / "part"
        with pytest.raises(ChecksumMismatch, match=r"sha256 is .* not the 0000"):
            fetch(server.url("/disk.img"), partial, "0" * 64)
        assert list(tmp_path.iterdir()) == []


def test_a_missing_image_is_a_404_error_leaving_nothing(tmp_path: Path) -> None:
    with image_server() as server:
        with pytest.raises(DownloadError, match="404"):
            fetch(server.url("/nope.img"), tmp_path / "part", "0" * 64)
        assert list(tmp_path.iterdir()) == []


def test_a_stalled_server_fails_within_the_read_timeout(tmp_path: Path) -> None:
    limits = Limits(max_size=LIMITS.max_size, connect_timeout=2, read_timeout=2)
    with image_server() as server:
        server.add("/disk.img", DATA)
        server.behaviour.stall = True
        started = time.monotonic()
        with pytest.raises(DownloadError, match=r"sent nothing for 2s .*read_timeout"):
            fetch(server.url("/disk.img"), tmp_path / "part", None, limits)
        elapsed = time.monotonic() - started
        assert server.stalled.is_set()
        # One attempt: a stall that brought nothing is not retried.
        assert 2 <= elapsed < 8, elapsed
        assert len(server.gets("/disk.img")) == 1


def test_an_interrupted_download_is_resumed_with_a_range_request(tmp_path: Path) -> None:
    with image_server() as server:
        sha = server.add("/disk.img", DATA)
        server.behaviour.break_after = 1024 * 1024
        server.behaviour.breaks_left = 1
        partial = tmp_path / "part"
        assert fetch(server.url("/disk.img"), partial, sha) == sha
        seen = server.gets("/disk.img")
        assert [r.range for r in seen] == [None, f"bytes={1024 * 1024}-"], seen
        assert seen[1].if_range is not None  # the ETag: a changed file would start over
        assert hashlib.sha256(partial.read_bytes()).hexdigest() == sha


def test_a_partial_file_left_by_an_earlier_attempt_is_continued(tmp_path: Path) -> None:
    """The first call ends (every attempt breaks off), the partial file stays; the next call
    asks only for the rest."""
    with image_server() as server:
        sha = server.add("/disk.img", DATA)
        server.behaviour.break_after = 0
        server.behaviour.breaks_left = 1
        partial = tmp_path / "part"
        with pytest.raises(DownloadError):
            fetch(server.url("/disk.img"), partial, sha)
        # Headers came, no body: nothing to resume from, and nothing kept but the validator.
        server.behaviour.break_after = 500_000
        server.behaviour.breaks_left = 10  # more than one call's attempts
        with pytest.raises(DownloadError, match=r"broke off|RemoteProtocolError"):
            fetch(server.url("/disk.img"), partial, sha)
        assert 0 < partial.stat().st_size < len(DATA)
        server.behaviour.breaks_left = 0
        before = partial.stat().st_size
        assert fetch(server.url("/disk.img"), partial, sha) == sha
        assert server.gets("/disk.img")[-1].range == f"bytes={before}-"


def test_an_image_over_the_size_limit_is_refused_before_its_body(tmp_path: Path) -> None:
    limits = Limits(max_size=1024 * 1024, connect_timeout=5, read_timeout=5)
    with image_server() as server:
        server.add("/disk.img", DATA)
        with pytest.raises(DownloadError, match="max_image_size"):
            fetch(server.url("/disk.img"), tmp_path / "part", None, limits)
        assert list(tmp_path.iterdir()) == []  # it can never become the image


@pytest.mark.parametrize("why", ["the server ignores Range", "the file changed on the server"])
def test_a_partial_file_that_cannot_be_continued_starts_over(tmp_path: Path, why: str) -> None:
    with image_server() as server:
        server.add("/disk.img", DATA)
        server.behaviour.break_after = 256 * 1024  # four attempts bring 1 of 3 MiB
        server.behaviour.breaks_left = 10
        partial = tmp_path / "part"
        with pytest.raises(DownloadError, match="broke off"):
            fetch(server.url("/disk.img"), partial, None)
        assert partial.stat().st_size > 0
        server.behaviour.breaks_left = 0
        new = DATA[::-1]
        if why == "the server ignores Range":
            server.behaviour.ignore_range = True
            sha = server.add("/disk.img", DATA)
        else:
            sha = server.add("/disk.img", new)  # another ETag: If-Range gets the whole file
        assert fetch(server.url("/disk.img"), partial, sha) == sha
        last = server.gets("/disk.img")[-1]
        assert last.range is not None and last.if_range is not None  # it asked to continue
        assert hashlib.sha256(partial.read_bytes()).hexdigest() == sha


def test_a_partial_file_from_another_url_is_not_continued(tmp_path: Path) -> None:
    """One image (one digest) may come from two URLs; bytes of two servers are never
    spliced: a partial file from one URL is started over from the other."""
    with image_server() as server:
        sha = server.add("/a.img", DATA)
        server.add("/b.img", DATA)
        server.behaviour.break_after = 256 * 1024
        server.behaviour.breaks_left = 10
        partial = tmp_path / "part"
        with pytest.raises(DownloadError, match="broke off"):
            fetch(server.url("/a.img"), partial, sha)
        server.behaviour.breaks_left = 0
        assert fetch(server.url("/b.img"), partial, sha) == sha
        assert [r.range for r in server.gets("/b.img")] == [None]
