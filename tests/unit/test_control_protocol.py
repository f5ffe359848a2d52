"""The control socket's requests: bad ones are refused naming the field; the CLI's output."""

from __future__ import annotations

from pathlib import Path

import pytest

from nomad_vm.cli.vms import format_info, format_list
from nomad_vm.control.protocol import (
    ProtocolError,
    Request,
    control_dir,
    decode_request,
    socket_path,
)


def test_each_installed_name_has_its_own_socket() -> None:
    data = Path("/var/lib/x")
    assert socket_path(data, "vm") == data / "control" / "control.sock"
    assert control_dir(data, "virt") == data / "control-virt"
    assert control_dir(data, "ch") != control_dir(data, "vm")


def test_good_requests() -> None:
    assert decode_request(b'{"op": "list"}\n') == Request("list")
    assert decode_request(b'{"op": "pause", "task": " a1b2 "}') == Request("pause", "a1b2")


@pytest.mark.parametrize(
    ("line", "names"),
    [
        (b"not json", "one JSON object"),
        (b"[1]", "a JSON object"),
        (b'{"op": "reboot"}', "op: must be one of list, info, pause, resume"),
        (b'{"op": "info"}', "task: info needs a task"),
        (b'{"op": "pause", "task": 3}', "task: must be a string"),
        (b'{"op": "list", "as": "root"}', "as: not a field of a request"),
    ],
)
def test_bad_requests_name_the_field_and_the_reason(line: bytes, names: str) -> None:
    with pytest.raises(ProtocolError, match=names):
        decode_request(line)


def test_the_cli_tables() -> None:
    assert format_list([]) == "no VM tasks"
    listed = format_list(
        [
            {
                "alloc_id": "a1b2c3d4-0000",
                "task": "web",
                "state": "paused",
                "pid": 42,
                "uptime_seconds": 3725,
                "backend": "qemu",
            }
        ]
    )
    assert listed.splitlines()[1].split() == ["a1b2c3d4", "web", "paused", "42", "1h02m05s", "qemu"]
    info = format_info(
        {
            "task_id": "a/web/1",
            "state": "running",
            "memory_bytes": 256 * 2**20,
            "plugged_memory_bytes": 0,
            "memory_used_bytes": None,
            "disks": [{"name": "disk0", "file": "/x/disk.qcow2", "format": "qcow2"}],
            "nics": [
                {
                    "host_link": "nvm1234",
                    "kind": "bridge",
                    "bridge": "nomadvm0",
                    "mac": "52:54:00:00:00:01",
                    "address": "192.168.122.10/24",
                    "guest_rx_bytes": 10,
                    "guest_tx_bytes": 20,
                    "guest_rx_packets": 1,
                    "guest_tx_packets": 2,
                }
            ],
            "device_io": {"disk0": {"read_bytes": 4096, "write_ops": 3}},
        }
    )
    assert "Memory:       256 MiB, guest use unknown" in info
    assert "  disk0: /x/disk.qcow2 (qcow2)" in info
    assert "nvm1234 (bridge on nomadvm0): mac 52:54:00:00:00:01, address 192.168.122.10/24" in info
    assert "guest rx 10 bytes / 1 packets, tx 20 bytes / 2 packets" in info
    assert "  disk0: read_bytes 4096, write_ops 3" in info


def test_the_cli_finds_each_names_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nomad_vm.cli.main import build_parser

    def run(*argv: str) -> str:
        args = build_parser().parse_args(["vm", *argv])
        assert args.func(args) == 1  # nobody serves in these directories
        return capsys.readouterr().err

    assert f"{tmp_path}/control/control.sock: no plugin answers" in run(
        "list", "--data-dir", str(tmp_path)
    )
    assert f"{tmp_path}/control-ch/control.sock" in run(
        "info", "x", "--as", "ch", "--data-dir", str(tmp_path)
    )
    assert "/var/lib/nomad-vm-virt/control-virt/control.sock" in run("pause", "x", "--as", "virt")
