"""Boot modes through the real plugin: UEFI (OVMF) on q35, microvm, and refused combinations."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from nomad_vm.vm.firmware import plan_firmware
from tests.integration.pluginkit import MARKER, drv, tiny_task
from tests.integration.test_vm_lifecycle import destroy, stop, wait


def test_uefi_on_q35_boots_with_a_private_variable_store(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    plan = plan_firmware("uefi")
    assert plan is not None
    template_digest = hashlib.sha256(plan.vars_template.read_bytes()).hexdigest()
    overrides = {
        "kernel": str(tiny_guest.vmlinuz),
        "firmware": "uefi",
        "os": {"arch": None, "machine": "q35"},
    }
    run = "test -d /sys/firmware/efi && echo ON-UEFI"
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="uefi", run=run, overrides=overrides
    ) as (cfg, fifo, alloc):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        (runtime,) = (alloc / "tiny").glob("nomad-vm-*")
        assert (runtime / "uefi-vars.fd").stat().st_mode & 0o777 == 0o600
        result = wait(plugin, cfg.id, timeout=240)
        assert fifo.wait_for(b"ON-UEFI", 5), bytes(fifo.data[-2000:])
        assert MARKER in fifo.data
        destroy(plugin, cfg.id)
    assert (result.result.exit_code, result.err) == (0, "")
    assert hashlib.sha256(plan.vars_template.read_bytes()).hexdigest() == template_digest


def test_uefi_secure_firmware_runs_through_the_driver(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The SMM build of OVMF, whose code Debian installs as a symlink (OVMF_CODE_4M.ms.fd),
    reaches QEMU as a descriptor like every other file and runs: with Debian's enrolled keys it
    refuses the tiny guest's unsigned kernel (test_firmware_boot.py boots signed ones)."""
    overrides = {
        "kernel": str(tiny_guest.vmlinuz),
        "firmware": "uefi-secure",
        "os": {"arch": None, "machine": "q35"},
    }
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="secure", overrides=overrides) as (
        cfg,
        fifo,
        _,
    ):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        try:
            assert fifo.wait_for(b"BdsDxe: failed to load", 120), bytes(fifo.data[-2000:])
        finally:
            destroy(plugin, cfg.id)


def test_microvm_boots_a_kernel(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    # Under TCG microvm has no timer to calibrate the TSC against: tell the kernel its rate.
    overrides = {
        "os": {"arch": None, "machine": "microvm"},
        "cmdline": f"{tiny_guest.cmdline} tsc_early_khz=2000000",
    }
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="micro", overrides=overrides) as (
        cfg,
        fifo,
        _,
    ):
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert fifo.wait_for(b"tiny guest: running", 120), bytes(fifo.data[-2000:])
        stop(plugin, cfg.id, 10)
        assert (wait(plugin, cfg.id).result.exit_code) == 0
        destroy(plugin, cfg.id)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        # Secure Boot needs q35 (unset, the machine follows: q35).
        ({"firmware": "uefi-secure", "os": {"machine": "pc"}}, "config.firmware"),
        ({"firmware": "uefi", "os": {"arch": None, "machine": "microvm"}}, "config.firmware"),
        ({"kernel": None, "image": None}, "config.image"),
        ({"os": {"arch": "aarch64", "machine": None}}, "config.os.arch"),
        ({"hostname": "not_a_label"}, "config.hostname"),
        ({"primary_disk_size": 0}, "config.primary_disk_size"),
    ],
)
def test_impossible_combinations_are_refused_naming_the_field(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    overrides: dict[str, object],
    field: str,
) -> None:
    with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="bad", overrides=overrides) as (
        cfg,
        _,
        alloc,
    ):
        with pytest.raises(grpc.RpcError) as err:
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
        assert list((alloc / "tiny").iterdir()) == []
