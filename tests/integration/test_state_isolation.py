"""A job cannot name the plugin's own state (issue 10, least privilege), through the real
plugin process (in a throwaway namespace, as in test_vm_network.py, since a lease needs the
plugin's bridge).

A first task runs with a disk, a cloud-init seed (with a password) and a NIC, its alloc path
long enough that its runtime dir moves under ``<data_dir>/run``. Then other jobs name its disk,
its seed, the lease file, its journal, a link to its disk planted in their own
allocation dir: each StartTask is refused naming the option, and creates nothing.
(Unit level: tests/unit/test_state_isolation.py.)"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.damaged_images import whole_qcow2
from tests.integration.pluginkit import tiny_task
from tests.integration.test_vm_network import NetHost, bridge_nic, host, network_block

pytestmark = pytest.mark.integration
__all__ = ["host"]  # the fixture, used by name

PRIVATE = "part of the VM driver's own state"
# Long enough that <alloc>/tiny/nomad-vm-<id>/qmp.sock exceeds the socket path limit, so the
# first task's runtime dir is <data_dir>/run/<hash>.
LONG_ALLOC = "victim-" + "v" * 80


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def test_a_job_naming_the_plugins_state_is_refused(
    host: NetHost, tiny_guest: Any, short_tmp: Path
) -> None:
    images = short_tmp / "images"
    images.mkdir()
    base = whole_qcow2(images / "base.qcow2")
    image_paths = [str(tiny_guest.vmlinux.parent), str(images)]
    plugin_options = {"network": network_block()}
    assert host.plugin is not None
    with contextlib.ExitStack() as stack:
        victim, _, _ = stack.enter_context(
            tiny_task(
                host.plugin,
                host.root,
                tiny_guest,
                alloc_name=LONG_ALLOC,
                image_paths=image_paths,
                plugin_options=plugin_options,
                overrides={
                    "image": str(base),
                    "default_user_password": "victim-secret-1",
                    "network_interface": bridge_nic(),
                    "share_task_dirs": False,
                },
            )
        )
        host.start(victim)
        runtime = only(list((host.data_dir / "run").iterdir()))
        disk, seed = runtime / "disk.qcow2", runtime / "cidata.iso"
        assert disk.is_file() and seed.is_file()
        journal = only(list((host.data_dir / "journal").glob("*.msgpack")))
        assert host.lease_file.is_file()

        # (option, what it names): absolute, through .., and through a link in the thief's
        # own allocation dir.
        targets: list[tuple[str, str]] = [
            ("image", str(disk)),
            ("image", str(seed)),
            ("initramfs", str(seed)),
            ("kernel", str(journal)),
            ("user_data", str(host.lease_file)),
            ("image", f"../../data/run/{runtime.name}/disk.qcow2"),
            ("image", "local/innocent.qcow2"),
        ]
        for i, (option, value) in enumerate(targets):
            overrides: dict[str, object] = {option: value, "share_task_dirs": False}
            if option == "user_data":
                overrides["image"] = str(base)  # user_data needs a disk to get a seed
            cfg, _, alloc = stack.enter_context(
                tiny_task(
                    host.plugin,
                    host.root,
                    tiny_guest,
                    alloc_name=f"thief{i}",
                    image_paths=image_paths,
                    plugin_options=plugin_options,
                    overrides=overrides,
                )
            )
            (alloc / "tiny" / "local").mkdir()
            os.symlink(disk, alloc / "tiny" / "local" / "innocent.qcow2")
            before = sorted(p.name for p in (host.data_dir / "run").iterdir())
            err = host.start_fails(cfg)  # also: no TAP, lease, rule or QEMU for it
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (value, err.details())
            details = err.details() or ""
            assert details.startswith(f"config.{option}: "), (value, details)
            assert PRIVATE in details, (value, details)
            assert "victim-secret-1" not in details
            assert sorted(p.name for p in (host.data_dir / "run").iterdir()) == before
            assert sorted(p.name for p in (alloc / "tiny").iterdir()) == ["local"]

        host.destroy(victim.id)
    host.assert_clean()
