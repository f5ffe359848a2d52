"""Guest hostnames: RFC 1123 labels, and a default that is unique per task."""

from __future__ import annotations

import re

from nomad_vm.errors import ConfigError

LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def validate_hostname(value: str, field: str = "config.hostname") -> str:
    if not LABEL.match(value):
        raise ConfigError(
            field,
            f"{value!r} is not a valid hostname: use 1 to 63 letters, digits and '-', "
            "starting and ending with a letter or digit (RFC 1123)",
        )
    return value


def default_hostname(task_name: str, alloc_id: str) -> str:
    """``<task>-<alloc id prefix>``, with the task name folded into a valid label."""
    suffix = alloc_id.replace("-", "")[:8].lower() or "vm"
    base = re.sub(r"[^a-z0-9-]+", "-", task_name.lower()).strip("-")[: 63 - len(suffix) - 1]
    return validate_hostname(f"{base}-{suffix}" if base else f"vm-{suffix}")
