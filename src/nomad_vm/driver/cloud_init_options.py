"""A task's cloud-init options: whether its VM gets a seed (the only way they reach the guest),
a ConfigError for one set on a VM without a seed (it would be dropped unseen), and the
user_data document, inline or read once from an allowed file (``storage.held``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from nomad_vm import schema
from nomad_vm.errors import ConfigError
from nomad_vm.fields import field_list
from nomad_vm.storage.held import read_allowed_text
from nomad_vm.storage.paths import Allowlist


def gets_cloud_init_seed(has_disk: bool, cloud_init: bool) -> bool:
    """A seed is attached to VMs that have a disk (`image`, or `disk {}` blocks: their primary
    is the boot disk, whatever it is made from), unless the task turned it off: a VM that
    boots only a kernel has no cloud-init to read it (its userland is the initramfs)."""
    return has_disk and cloud_init


def refuse_cloud_init_options(values: Mapping[str, object]) -> None:
    """For a VM without a seed: a ConfigError naming the first cloud-init option that is set
    (and the others), since nothing else would apply it and it would be dropped unseen."""
    given = [name for name in schema.CLOUD_INIT_OPTIONS if values.get(name)]
    if not given:
        return
    first, *others = given
    if values.get("image") or values.get("disk"):
        why = "cloud_init = false"
        fix = f"remove {first}, or set cloud_init = true if the image has cloud-init"
    else:
        why = "it boots a kernel without a disk image (the seed comes with `image` or `disk`)"
        fix = f"remove {first}, or boot from an `image` that has cloud-init"
    also = f" (as do {field_list(others)})" if others else ""
    raise ConfigError(
        f"config.{first}",
        f"only takes effect through cloud-init{also}, and this VM gets no cloud-init seed "
        f"because {why}; {fix}",
    )


def read_user_data(value: object, allowed: Allowlist, task_dir: str) -> str | None:
    """Inline documents start with '#' (``#cloud-config``, ``#!``); anything else is a path."""
    if not value:
        return None
    text = str(value)
    if text.lstrip().startswith("#") or "\n" in text:
        return text
    candidate = Path(text) if os.path.isabs(text) else Path(task_dir) / text
    try:
        # Opened once, checked on the descriptor, read from it (storage.held).
        return read_allowed_text(
            "config.user_data",
            candidate,
            allowed,
            subject=text,
            advice="add its directory to the plugin's image_paths",
        )
    except OSError as exc:
        raise ConfigError("config.user_data", f"cannot read {text}: {exc}") from exc
