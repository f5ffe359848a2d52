"""One image download over HTTP(S) with httpx: into a partial file, resumed with a Range
request when one is there, hashed as it arrives, limited in size and in time.

* Resuming: a partial file (a download interrupted here, or by a plugin that died) is
  continued with ``Range: bytes=<its size>-`` and ``If-Range`` with the validator the server
  gave (ETag, else Last-Modified), so a file that changed on the server starts over (200)
  instead of being spliced. The digest covers the partial bytes read back first.
* Within one call a connection that breaks after bytes arrived is tried again (resumed) a few
  times; one that brings nothing ends the call, so a stalled server fails in
  ``connect_timeout + read_timeout``, not a multiple of it.
* The digest is checked before the file becomes the image; a mismatch removes the partial
  file (it can never become right).

Errors are ``DownloadError`` with the reason; the caller names the option.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from nomad_vm.files import write_atomically
from nomad_vm.storage.image_url import without_credentials

CHUNK = 1 << 20
# Attempts in one call when a connection breaks after bytes arrived.
ATTEMPTS = 4
MAX_REDIRECTS = 5


class DownloadError(Exception):
    """The image could not be downloaded; the message says why."""


class ChecksumMismatch(DownloadError):
    pass


class _TooLarge(DownloadError):
    """Over max_image_size: the partial file can never become the image."""


@dataclass(frozen=True)
class Limits:
    max_size: int
    connect_timeout: float
    read_timeout: float
    schemes: tuple[str, ...] = ("https", "http")


# (bytes so far, total or None) -> None; called for every chunk, the caller rate-limits.
Progress = Callable[[int, int | None], None]


async def download(
    url: str,
    partial: Path,
    expected_sha256: str | None,
    limits: Limits,
    progress: Progress,
) -> str:
    """Fetch ``url`` into ``partial`` (continuing it if present); its sha256 (checked against
    ``expected_sha256`` when given). DownloadError otherwise."""
    partial.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    timeout = httpx.Timeout(
        connect=limits.connect_timeout,
        read=limits.read_timeout,
        write=limits.read_timeout,
        pool=limits.connect_timeout,
    )

    async def refuse_scheme(request: httpx.Request) -> None:
        # A redirect may not leave the schemes the operator allows (https -> http).
        if request.url.scheme not in limits.schemes:
            raise DownloadError(
                f"redirected to a {request.url.scheme}:// URL, which this node does not accept"
            )

    async with httpx.AsyncClient(
        timeout=timeout,
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        event_hooks={"request": [refuse_scheme]},
    ) as client:
        for _attempt in range(ATTEMPTS):
            before = _size(partial)
            try:
                await _attempt_once(client, url, partial, limits, progress)
                break
            except _TooLarge:
                await asyncio.to_thread(_discard, partial)
                raise
            except (httpx.RequestError, _Incomplete) as exc:
                if _size(partial) <= before:
                    raise DownloadError(_transport_reason(exc, limits)) from None
        else:
            raise DownloadError(f"the download broke off {ATTEMPTS} times")
    digest = await asyncio.to_thread(_sha256_of, partial)
    if expected_sha256 is not None and digest != expected_sha256:
        await asyncio.to_thread(_discard, partial)
        raise ChecksumMismatch(
            f"the downloaded file's sha256 is {digest}, not the {expected_sha256} the task "
            "gave; it was removed"
        )
    return digest


class _Incomplete(Exception):
    """The body ended before Content-Length (a resumable break)."""


async def _attempt_once(
    client: httpx.AsyncClient, url: str, partial: Path, limits: Limits, progress: Progress
) -> None:
    have = _size(partial)
    validator = _validator(partial, url)
    headers = {"Accept-Encoding": "identity"}
    if have and validator:
        headers["Range"] = f"bytes={have}-"
        headers["If-Range"] = validator
    async with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 206 and _range_start(response) == have:
            offset = have
        elif response.status_code == 200:
            offset = 0
        elif response.status_code == 416 and have:
            # The partial file is no prefix of the server's file (it is as long or longer):
            # start over rather than trust it.
            _discard(partial)
            return await _attempt_once(client, url, partial, limits, progress)
        else:
            raise DownloadError(
                f"the server answered {response.status_code} {response.reason_phrase}"
            )
        total = _total(response, offset)
        if total is not None and total > limits.max_size:
            raise _TooLarge(
                f"the image is {total} bytes, more than image_cache.max_image_size "
                f"({limits.max_size} bytes)"
            )
        if offset == 0:
            _save_validator(partial, url, response)
        received = offset
        # A 200 (no partial, or the server's file changed) starts over.
        with open(partial, "r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate(offset)
            # As received (a chunk size would hold bytes back until it fills, and lose them
            # when the connection breaks).
            async for chunk in response.aiter_raw():
                received += len(chunk)
                if received > limits.max_size:
                    raise _TooLarge(
                        f"the image grew beyond image_cache.max_image_size ({limits.max_size} "
                        "bytes) while it downloaded"
                    )
                out.write(chunk)
                progress(received, total)
        if total is not None and received < total:
            raise _Incomplete(f"{received} of {total} bytes")


def _range_start(response: httpx.Response) -> int | None:
    value = response.headers.get("content-range", "")
    unit, _, spec = value.partition(" ")
    if unit != "bytes" or "-" not in spec:
        return None
    try:
        return int(spec.split("-", 1)[0])
    except ValueError:
        return None


def _total(response: httpx.Response, offset: int) -> int | None:
    length = response.headers.get("content-length")
    try:
        return offset + int(length) if length is not None else None
    except ValueError:
        return None


def _validator(partial: Path, url: str) -> str:
    """The validator of the partial file, if it came from ``url`` (tasks may give one image,
    by its digest, from different URLs: bytes of two servers are never spliced)."""
    try:
        raw = json.loads(Path(f"{partial}.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(raw, dict) or raw.get("source") != _source_id(url):
        return ""
    return str(raw.get("validator", ""))


def _save_validator(partial: Path, url: str, response: httpx.Response) -> None:
    """Kept with the partial file for If-Range (a weak ETag cannot validate a range)."""
    etag = response.headers.get("etag", "")
    validator = etag if etag and not etag.startswith("W/") else ""
    validator = validator or response.headers.get("last-modified", "")
    # The URL for `nomad-vm image ls` without user:password; only its hash to compare.
    raw = {"url": without_credentials(url), "source": _source_id(url), "validator": validator}
    write_atomically(Path(f"{partial}.json"), json.dumps(raw).encode(), durable=False)


def _source_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    Path(f"{partial}.json").unlink(missing_ok=True)


def _transport_reason(exc: Exception, limits: Limits) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection within {limits.connect_timeout:g}s (image_cache.connect_timeout)"
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout | httpx.PoolTimeout):
        return (
            f"the server sent nothing for {limits.read_timeout:g}s (image_cache.read_timeout); "
            "the next start resumes the download"
        )
    if isinstance(exc, httpx.TooManyRedirects):
        return f"more than {MAX_REDIRECTS} redirects"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
