"""Plugin and task configuration as typed values, validated against ``nomad_vm.schema``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nomad_vm import schema
from nomad_vm.driver.types import TaskConfig
from nomad_vm.errors import ConfigError
from nomad_vm.storage.paths import resolve_allowed_file


@dataclass(frozen=True)
class PluginConfig:
    data_dir: Path
    image_paths: tuple[str, ...]
    accelerator: str
    qemu_binary: str


@dataclass(frozen=True)
class VMTaskConfig:
    """A task's `config {}` after validation; paths are resolved and allowed."""

    kernel: Path
    initramfs: Path | None
    cmdline: str


def parse_plugin_config(raw: Mapping[str, object] | None) -> PluginConfig:
    values = schema.validate(schema.PLUGIN_CONFIG, raw, "config")
    data_dir = str(values["data_dir"])
    if not Path(data_dir).is_absolute():
        raise ConfigError("config.data_dir", f"must be an absolute path, got {data_dir!r}")
    paths = values["image_paths"]
    assert isinstance(paths, list)
    for i, p in enumerate(paths):
        if not Path(p).is_absolute():
            raise ConfigError(f"config.image_paths[{i}]", f"must be an absolute path, got {p!r}")
    return PluginConfig(
        data_dir=Path(data_dir),
        image_paths=tuple(paths),
        accelerator=str(values["accelerator"]),
        qemu_binary=str(values["qemu_binary"]),
    )


def parse_task_config(task: TaskConfig, plugin: PluginConfig) -> VMTaskConfig:
    """Validate a task's config; errors name the option as ``config.<name>``."""
    values = schema.validate(schema.TASK_CONFIG, task.driver_config, "config")
    allowed = (*plugin.image_paths, str(plugin.data_dir), task.alloc_dir)
    kernel = values["kernel"]
    if not kernel:
        raise ConfigError(
            "config.kernel", 'is required: set kernel = "/path/to/vmlinux" for direct kernel boot'
        )
    initramfs = values["initramfs"]
    return VMTaskConfig(
        kernel=resolve_allowed_file("config.kernel", str(kernel), allowed, task.task_dir),
        initramfs=(
            resolve_allowed_file("config.initramfs", str(initramfs), allowed, task.task_dir)
            if initramfs
            else None
        ),
        cmdline=str(values["cmdline"] or ""),
    )
