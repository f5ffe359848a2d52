"""What makes a guest online hot-plugged memory (memory_max): the seed's bootcmd, merged with
the user's document, and the start event for a VM that gets no seed."""

from __future__ import annotations

import email
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from nomad_vm.cloudinit import CloudInitRequest, render
from nomad_vm.cloudinit.memory_online import ONLINE_MOVABLE_BOOTCMD
from nomad_vm.driver.memory_guest import onlining_note
from tests.unit.test_memory_policy import plan_with_memory_max


def user_data_config(user_data: str) -> dict[str, Any]:
    """Our generated document (the first part when the user gave one)."""
    message = email.message_from_string(user_data)
    if message.is_multipart():
        payload = message.get_payload()[0].get_payload(decode=True)
        assert isinstance(payload, bytes)
        user_data = payload.decode()
    data = yaml.safe_load(user_data)
    assert isinstance(data, dict)
    return data


def test_the_seed_of_a_vm_with_memory_max_onlines_plugged_memory_as_movable() -> None:
    req = CloudInitRequest(instance_id="nomad-1", hostname="web-1", online_hotplug_memory=True)
    assert user_data_config(render(req).user_data)["bootcmd"] == [ONLINE_MOVABLE_BOOTCMD]
    plain = CloudInitRequest(instance_id="nomad-1", hostname="web-1")
    assert "bootcmd" not in user_data_config(render(plain).user_data)


def test_the_users_own_document_is_a_second_part_next_to_the_bootcmd() -> None:
    # cloud-init appends the user's bootcmd to ours (USER_PART_MERGE_TYPE: list(append)).
    mine = "#cloud-config\nbootcmd: [echo mine]\n"
    req = CloudInitRequest(
        instance_id="nomad-1", hostname="web-1", user_data_text=mine, online_hotplug_memory=True
    )
    docs = render(req)
    assert user_data_config(docs.user_data)["bootcmd"] == [ONLINE_MOVABLE_BOOTCMD]
    assert "echo mine" in docs.user_data


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
def test_the_bootcmd_onlines_what_is_offline_and_sets_the_policy(tmp_path: Path) -> None:
    """Run against a copy of the sysfs layout: the policy file and one block per state."""
    sysfs = tmp_path / "memory"
    sysfs.mkdir()
    (sysfs / "auto_online_blocks").write_text("offline\n")
    for name, state in (("memory0", "online"), ("memory8", "offline")):
        (sysfs / name).mkdir()
        (sysfs / name / "state").write_text(f"{state}\n")
    script = ONLINE_MOVABLE_BOOTCMD.replace("/sys/devices/system/memory", str(sysfs))
    subprocess.run(["sh", "-c", script], check=True)
    assert (sysfs / "auto_online_blocks").read_text() == "online_movable\n"
    assert (sysfs / "memory8" / "state").read_text() == "online_movable\n"
    assert (sysfs / "memory0" / "state").read_text() == "online\n"  # left alone


def image_task(tmp_path: Path, memory_max: int, **options: object):  # type: ignore[no-untyped-def]
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "images" / "disk.qcow2").write_bytes(b"x")
    image = str(tmp_path / "images" / "disk.qcow2")
    return plan_with_memory_max(tmp_path, memory_max, {"image": image, **options})


def test_a_task_with_memory_max_gets_the_bootcmd_in_its_seed(tmp_path: Path) -> None:
    plan = image_task(tmp_path, 512)
    assert plan.seed is not None
    assert user_data_config(plan.seed.user_data)["bootcmd"] == [ONLINE_MOVABLE_BOOTCMD]
    assert onlining_note(plan) is None
    plain = image_task(tmp_path, 0)
    assert plain.seed is not None and "bootcmd" not in plain.seed.user_data


def test_without_a_seed_the_operator_is_told_what_the_guest_needs(tmp_path: Path) -> None:
    note = onlining_note(image_task(tmp_path, 512, cloud_init=False))
    assert note is not None
    assert note.startswith("Memory hot-plug: this VM gets no cloud-init seed (cloud_init = false)")
    assert "memhp_default_state=online_movable" in note and "docs/memory.md" in note
    kernel_only = onlining_note(plan_with_memory_max(tmp_path, 512, {}))
    assert kernel_only is not None and "boots a kernel without a disk image" in kernel_only


def test_no_note_when_the_cmdline_onlines_it_or_there_is_no_memory_max(tmp_path: Path) -> None:
    cmdline = {"cmdline": "console=ttyS0 memhp_default_state=online_movable"}
    assert onlining_note(plan_with_memory_max(tmp_path, 512, cmdline)) is None
    assert onlining_note(image_task(tmp_path, 0, cloud_init=False)) is None
