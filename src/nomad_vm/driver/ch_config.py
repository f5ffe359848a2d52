"""The plugin's `cloud_hypervisor { ... }` block (nomad-driver-ch's names) as a typed value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nomad_vm import schema
from nomad_vm.errors import ConfigError
from nomad_vm.fields import Schema, validate


@dataclass(frozen=True)
class CloudHypervisorConfig:
    """The plugin's `cloud_hypervisor { ... }` block (names as in nomad-driver-ch)."""

    bin: str = "cloud-hypervisor"
    remote_bin: str = ""
    virtiofsd_bin: str = ""
    default_kernel: Path | None = None
    default_initramfs: Path | None = None
    firmware: Path | None = None
    seccomp: str = "true"
    log_file: Path | None = None
    trust_kvm: bool = False


def parse_cloud_hypervisor(raw: object) -> CloudHypervisorConfig:
    """The block, absent or not, with its defaults; its file paths must be absolute (they are
    the operator's, used as given, so a relative one would depend on the agent's cwd)."""
    schema_of = _plugin_block_schema("cloud_hypervisor")
    values = raw if isinstance(raw, dict) else validate(schema_of, {}, schema_of.where)

    def path(name: str) -> Path | None:
        value = str(values[name] or "")
        if not value:
            return None
        if not Path(value).is_absolute():
            raise ConfigError(
                f"config.cloud_hypervisor.{name}", f"must be an absolute path, got {value!r}"
            )
        return Path(value)

    kernel, initramfs = path("default_kernel"), path("default_initramfs")
    if initramfs is not None and kernel is None:
        raise ConfigError(
            "config.cloud_hypervisor.default_initramfs",
            "needs default_kernel: it is loaded with the default kernel only",
        )
    return CloudHypervisorConfig(
        bin=str(values["bin"]),
        remote_bin=str(values["remote_bin"] or ""),
        virtiofsd_bin=str(values["virtiofsd_bin"] or ""),
        default_kernel=kernel,
        default_initramfs=initramfs,
        firmware=path("firmware"),
        seccomp=str(values["seccomp"]),
        log_file=path("log_file"),
        trust_kvm=bool(values["trust_kvm"]),
    )


def _plugin_block_schema(name: str) -> Schema:
    block = schema.PLUGIN_CONFIG.field(name)
    return Schema(block.name, f"config.{name}", block.fields)
