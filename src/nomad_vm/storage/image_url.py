"""An image given by URL: `image` (or a disk's `source { image }`) that starts with a scheme.

The checksum says which bytes the task wants; it is given either as its own option
(`image_checksum`, a disk's `source { checksum }`) or go-getter style in the URL's query
(`?checksum=sha256:<hex>`, as Nomad users write it in `artifact`), never both differently.
Only sha256 is taken: it is also the cache's address (``storage.image_store``), so a weaker
digest would let two different images share a name. The URL the plugin fetches is the one
given with the `checksum` parameter removed (a server never sees it, as with go-getter).

Validation only; errors name the option. What schemes and whether a checksum is required
are the operator's (``storage.cache_policy``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from nomad_vm.errors import ConfigError

SHA256 = re.compile(r"[0-9a-f]{64}")
# Anything that looks like "<scheme>://": a local path never does, so a typo in a scheme
# ("htps://") is an error naming the option, not "no such file".
_URL_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# The longest URL taken: it is shown in events and `nomad-vm image ls`, and recorded.
MAX_URL_LENGTH = 4096


@dataclass(frozen=True)
class ImageURL:
    """A validated image URL: what to fetch and the digest it must have (None: the operator
    lets images come without a checksum)."""

    url: str
    sha256: str | None
    field: str  # the option that gave the URL (for errors)
    checksum_field: str  # the option that gives (or would give) its checksum

    @property
    def shown(self) -> str:
        """For events and messages: the URL without user:password."""
        return without_credentials(self.url)


def without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


@dataclass(frozen=True)
class UrlRules:
    """What the operator accepts (``storage.cache_policy``)."""

    schemes: tuple[str, ...] = ("https", "http")
    checksum_required: bool = True


def image_source(
    field: str, value: str, checksum: str, checksum_field: str, rules: UrlRules
) -> ImageURL | None:
    """``value`` as an ImageURL when it is a URL; None for a path (whose checksum option must
    then be empty)."""
    if not looks_like_url(value):
        refuse_checksum_without_url(checksum_field, checksum)
        return None
    return parse_image_url(
        field,
        value,
        checksum,
        checksum_field,
        schemes=rules.schemes,
        checksum_required=rules.checksum_required,
    )


def looks_like_url(value: str) -> bool:
    return bool(_URL_LIKE.match(value))


def parse_image_url(
    field: str,
    value: str,
    checksum: str,
    checksum_field: str,
    *,
    schemes: tuple[str, ...],
    checksum_required: bool,
) -> ImageURL:
    """``value`` (a URL) with ``checksum`` (an option's value, may be "") as an ImageURL."""
    if len(value) > MAX_URL_LENGTH:
        raise ConfigError(field, f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(field, f"{value!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes) or "none (image_cache.allowed_schemes)"
        raise ConfigError(
            field,
            f"{scheme}:// URLs are not accepted for images on this node (accepted: {allowed}; "
            "the plugin's image_cache.allowed_schemes); or give a path",
        )
    if not parts.hostname:
        raise ConfigError(field, f"{value!r} names no host")
    if parts.fragment:
        raise ConfigError(field, f"{value!r}: a URL of an image has no #fragment")
    query = parse_qsl(parts.query, keep_blank_values=True)
    in_url = [v for k, v in query if k == "checksum"]
    rest = [(k, v) for k, v in query if k != "checksum"]
    if len(in_url) > 1:
        raise ConfigError(field, "the URL gives ?checksum= more than once")
    digest = _digest(checksum_field, checksum) if checksum else None
    if in_url:
        from_url = _digest(f"{field} (?checksum=)", in_url[0])
        if digest is not None and digest != from_url:
            raise ConfigError(
                checksum_field, f"differs from the URL's ?checksum= ({from_url}); give one"
            )
        digest = from_url
    if digest is None and checksum_required:
        raise ConfigError(
            checksum_field,
            "an image by URL needs its checksum (sha256:<64 hex digits>), here or as "
            "?checksum=sha256:... in the URL, so the node runs exactly the bytes the job "
            "names (the operator can allow URLs without one: image_cache.checksum_required)",
        )
    url = urlunsplit((scheme, parts.netloc, parts.path or "/", urlencode(rest), ""))
    return ImageURL(url, digest, field, checksum_field)


def refuse_checksum_without_url(checksum_field: str, checksum: str) -> None:
    if checksum:
        raise ConfigError(
            checksum_field, "is only for an image given by URL (a local image is used as it is)"
        )


def _digest(field: str, value: str) -> str:
    """The hex digest of ``sha256:<hex>``."""
    algorithm, _, hexdigest = value.strip().partition(":")
    if not hexdigest:
        raise ConfigError(field, f"{value!r}: write the checksum as sha256:<64 hex digits>")
    if algorithm.lower() != "sha256":
        raise ConfigError(
            field,
            f"{algorithm!r} checksums are not taken, only sha256 (the image cache is addressed "
            "by it): sha256:<64 hex digits>",
        )
    hexdigest = hexdigest.lower()
    if not SHA256.fullmatch(hexdigest):
        raise ConfigError(field, f"{value!r}: a sha256 checksum is 64 hex digits")
    return hexdigest
