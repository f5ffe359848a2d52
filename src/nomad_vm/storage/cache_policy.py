"""The image cache's policy (the plugin's `image_cache {}` block), typed.

The plugin also writes it into the cache (``policy.json``) so that `nomad-vm image gc`, run
by an operator without the agent's configuration at hand, applies the same policy."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from nomad_vm.errors import ConfigError
from nomad_vm.storage.disk_request import parse_size

_DURATION = re.compile(r"(\d+)(d|h|m|s)")
_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
SCHEMES = ("https", "http")
GIB = 1024**3


@dataclass(frozen=True)
class CachePolicy:
    max_size: int = 50 * GIB
    max_unused_age: float = 168 * 3600.0
    max_image_size: int = 20 * GIB
    allowed_schemes: tuple[str, ...] = SCHEMES
    checksum_required: bool = True
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    gc_interval: float = 600.0
    # Where it came from, for messages.
    prefix: str = field(default="config.image_cache", compare=False)

    def to_json(self) -> str:
        raw = asdict(self)
        raw.pop("prefix")
        return json.dumps(raw, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CachePolicy:
        raw = json.loads(text)
        raw["allowed_schemes"] = tuple(raw["allowed_schemes"])
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def parse_duration(field: str, value: str) -> float:
    """`90m`, `72h`, `7d`, `1h30m`, `0s`: seconds."""
    text = value.strip()
    if not text or not re.fullmatch(f"(?:{_DURATION.pattern})+", text):
        raise ConfigError(field, f"{value!r} is not a duration: e.g. 90m, 72h, 7d or 1h30m")
    return float(sum(int(n) * _SECONDS[u] for n, u in _DURATION.findall(text)))


def parse_cache_policy(block: Mapping[str, object] | None) -> CachePolicy:
    """The validated block (schema defaults filled in; None: the block is absent)."""
    if not block:
        return CachePolicy()
    prefix = "config.image_cache"
    schemes = tuple(str(s).lower() for s in block["allowed_schemes"])  # type: ignore[attr-defined]
    for i, scheme in enumerate(schemes):
        if scheme not in SCHEMES:
            raise ConfigError(
                f"{prefix}.allowed_schemes[{i}]",
                f"{scheme!r}: images are downloaded over {' or '.join(SCHEMES)} only",
            )
    return CachePolicy(
        max_size=_size(f"{prefix}.max_size", block["max_size"]),
        max_unused_age=parse_duration(f"{prefix}.max_unused_age", str(block["max_unused_age"])),
        max_image_size=_size(f"{prefix}.max_image_size", block["max_image_size"]),
        allowed_schemes=schemes,
        checksum_required=bool(block["checksum_required"]),
        connect_timeout=float(block["connect_timeout"]),  # type: ignore[arg-type]
        read_timeout=float(block["read_timeout"]),  # type: ignore[arg-type]
        gc_interval=max(1.0, parse_duration(f"{prefix}.gc_interval", str(block["gc_interval"]))),
    )


def _size(field: str, value: object) -> int:
    size = parse_size(value, field)
    if size is None:
        raise ConfigError(field, "must be a size, e.g. 50GiB")
    return size
