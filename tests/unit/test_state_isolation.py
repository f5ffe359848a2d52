"""No job can name the plugin's own state (issue 10, least privilege): files under its data_dir
(leases, task journals, long-path runtime dirs with other tasks' disks and seeds) and the
runtime dirs in an allocation are refused for every path option and for an image's backing
file, even where an allowed directory contains them; and image_paths may not overlap data_dir.
The same through the real plugin process: tests/integration/test_state_isolation.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nomad_vm.driver.config import parse_plugin_config, parse_task_config, task_allowlist
from nomad_vm.driver.journal import TaskJournal
from nomad_vm.driver.journal_store import JournalStore
from nomad_vm.driver.types import TaskConfig
from nomad_vm.errors import ConfigError, ImageError
from nomad_vm.storage.chain import backing_of
from nomad_vm.storage.disk import MIB
from nomad_vm.storage.held import FileHolder
from nomad_vm.storage.qemu_img import ImageInfo
from tests.unit.tasks import unit_task

PRIVATE = "part of the VM driver's own state"
PATH_OPTIONS = ("kernel", "initramfs", "image", "user_data")


def task(alloc_dir: Path, driver_config: dict[str, object], name: str = "t") -> TaskConfig:
    return unit_task(alloc_dir, driver_config, name)


def options(name: str, value: str) -> dict[str, object]:
    """A task config naming ``value`` for option ``name`` (with what it needs to be valid)."""
    if name == "initramfs":
        return {"kernel": "vmlinux", "initramfs": value}
    if name == "user_data":
        return {"image": "disk.img", "user_data": value}
    return {name: value}


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """images/, data/ (the plugin's, with a lease file and another task's runtime dir), and
    an allocation alloc/ whose task dir t/ has the files the options above name."""
    paths = {name: tmp_path / name for name in ("images", "data", "alloc")}
    for path in paths.values():
        path.mkdir()
    (paths["data"] / "network").mkdir()
    (paths["data"] / "network" / "leases-nomadvm0.json").write_text('{"leases": {}}')
    other_run = paths["data"] / "run" / "0123456789abcdef"
    other_run.mkdir(parents=True)
    (other_run / "disk.qcow2").write_bytes(b"QFI\xfb")
    (other_run / "cidata.iso").write_bytes(b"\0" * 2048)
    journal = JournalStore(paths["data"])
    journal.save(TaskJournal("other-alloc/web/1", "qemu", 1.0, runtime_dir=str(other_run)))
    (paths["alloc"] / "t").mkdir()
    for name in ("vmlinux", "disk.img"):
        (paths["alloc"] / "t" / name).write_bytes(b"x")
    return paths


def test_nothing_under_data_dir_can_be_named(layout: dict[str, Path]) -> None:
    plugin = parse_plugin_config(
        {"data_dir": str(layout["data"]), "image_paths": [str(layout["images"])]}
    )
    targets = [
        layout["data"] / "network" / "leases-nomadvm0.json",
        layout["data"] / "run" / "0123456789abcdef" / "disk.qcow2",
        layout["data"] / "run" / "0123456789abcdef" / "cidata.iso",
        JournalStore(layout["data"]).path_for("other-alloc/web/1"),  # another task's journal
    ]
    for name in PATH_OPTIONS:
        for target in targets:
            with pytest.raises(ImageError) as err:
                parse_task_config(task(layout["alloc"], options(name, str(target))), plugin)
            assert err.value.field == f"config.{name}", err.value
            assert PRIVATE in err.value.reason and str(target) in err.value.reason
            assert "image_paths or in its own allocation directory" in err.value.reason


def test_data_dir_is_refused_even_inside_the_allocation_dir(layout: dict[str, Path]) -> None:
    """data_dir inside an allowed directory (here the allocation's) stays private."""
    data = layout["alloc"] / "data"
    (data / "network").mkdir(parents=True)
    lease = data / "network" / "leases-nomadvm0.json"
    lease.write_text('{"leases": {}}')
    plugin = parse_plugin_config({"data_dir": str(data)})
    for value in (str(lease), "../data/network/leases-nomadvm0.json"):
        with pytest.raises(ImageError) as err:
            parse_task_config(task(layout["alloc"], {"kernel": value}), plugin)
        assert err.value.field == "config.kernel" and PRIVATE in err.value.reason


def test_a_symlink_in_the_task_dir_into_data_dir_is_refused(layout: dict[str, Path]) -> None:
    plugin = parse_plugin_config({"data_dir": str(layout["data"])})
    link = layout["alloc"] / "t" / "innocent.img"
    os.symlink(layout["data"] / "run" / "0123456789abcdef" / "disk.qcow2", link)
    with pytest.raises(ImageError) as err:
        parse_task_config(task(layout["alloc"], {"image": "innocent.img"}), plugin)
    assert err.value.field == "config.image" and PRIVATE in err.value.reason


def test_runtime_dirs_in_the_allocation_are_refused(layout: dict[str, Path]) -> None:
    """A sibling task's runtime dir holds its disk and its seed (with its environment): not
    even a task of the same allocation may name them; its own files still can."""
    plugin = parse_plugin_config({"data_dir": str(layout["data"])})
    sibling = layout["alloc"] / "web" / "nomad-vm-abcd1234"
    sibling.mkdir(parents=True)
    (sibling / "cidata.iso").write_bytes(b"\0" * 2048)
    for value in ("../web/nomad-vm-abcd1234/cidata.iso", str(sibling / "cidata.iso")):
        with pytest.raises(ImageError) as err:
            parse_task_config(task(layout["alloc"], {"image": value}), plugin)
        assert err.value.field == "config.image" and PRIVATE in err.value.reason
    own = parse_task_config(task(layout["alloc"], {"image": "disk.img"}), plugin)
    assert own.image == layout["alloc"] / "t" / "disk.img"


def test_a_symlink_to_another_allocation_is_refused(tmp_path: Path) -> None:
    """The task's alloc dir is allowed, resolved: a link planted there (by the guest through a
    writable share, say) that leads into another allocation does not pass."""
    mine, theirs = tmp_path / "alloc-mine", tmp_path / "alloc-theirs"
    (mine / "t" / "local").mkdir(parents=True)
    (theirs / "t" / "local").mkdir(parents=True)
    (theirs / "t" / "local" / "disk.img").write_bytes(b"theirs")
    os.symlink(theirs / "t" / "local" / "disk.img", mine / "t" / "local" / "disk.img")
    plugin = parse_plugin_config({"data_dir": str(tmp_path / "data")})
    for value in ("local/disk.img", "../../alloc-theirs/t/local/disk.img"):
        with pytest.raises(ImageError) as err:
            parse_task_config(task(mine, {"image": value}), plugin)
        assert err.value.field == "config.image"
        assert "outside the allowed directories" in err.value.reason
        assert str(theirs) not in err.value.reason.split("allowed directories")[1]


def test_a_backing_file_in_data_dir_is_refused(layout: dict[str, Path]) -> None:
    """An image in image_paths whose backing file is another task's disk."""
    plugin = parse_plugin_config(
        {"data_dir": str(layout["data"]), "image_paths": [str(layout["images"])]}
    )
    allowed = task_allowlist(task(layout["alloc"], {}), plugin)
    theirs = layout["data"] / "run" / "0123456789abcdef" / "disk.qcow2"
    level = ImageInfo(
        path=layout["images"] / "overlay.qcow2",
        format="qcow2",
        virtual_size=64 * MIB,
        actual_size=4096,
        backing_chain=(str(theirs),),
        backing_format="qcow2",
    )
    with pytest.raises(ImageError) as err, FileHolder() as holder:
        backing_of(level, allowed, "config.image", holder)
    assert err.value.field == "config.image" and PRIVATE in err.value.reason


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_image_paths_may_not_overlap_data_dir(tmp_path: Path, where: str) -> None:
    data = tmp_path / "srv" / "nomad-vm"
    data.mkdir(parents=True)
    image_dir = {
        "same": data,
        "parent": tmp_path / "srv",
        "inside": data / "images",
        "symlink": tmp_path / "images-link",
    }[where]
    if where == "symlink":
        os.symlink(data, image_dir)
    raw = {"data_dir": str(data), "image_paths": ["/srv/vm-images", str(image_dir)]}
    with pytest.raises(ConfigError) as err:
        parse_plugin_config(raw)
    assert err.value.field == "config.image_paths[1]"
    assert "data_dir" in err.value.reason and "move data_dir out of it" in err.value.reason
    # Beside each other is fine.
    parse_plugin_config({"data_dir": str(data), "image_paths": [str(tmp_path / "images")]})
