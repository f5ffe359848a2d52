"""A VM booted from an image given by URL through the real plugin process: the image is served
by a real HTTP server on loopback, downloaded into the plugin's cache, verified, and the guest
(the tiny one, under real QEMU) reads it through its thin overlay; a second task of the same
image downloads nothing, and destroying both releases the image for removal."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import grpc
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import driver_pb2
from nomad_vm.storage.image_store import ImageStore
from nomad_vm.storage.tools import find_qemu_img
from tests.image_server import image_server
from tests.integration.pluginkit import drv
from tests.integration.test_vm_lifecycle import _run_to_completion, collect_events

MARKER = b"URLDISK!"


def test_a_vm_boots_from_an_image_downloaded_once(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    raw = short_tmp / "src.raw"
    raw.write_bytes(MARKER + bytes(16 * 1024 * 1024 - len(MARKER)))
    qcow2 = short_tmp / "src.qcow2"
    subprocess.run(
        [str(find_qemu_img()), "convert", "-q", "-O", "qcow2", str(raw), str(qcow2)], check=True
    )
    stream, events = collect_events(plugin)
    with image_server() as server:
        sha = server.add("/tiny-disk.qcow2", qcow2.read_bytes())
        # go-getter style checksum for one task, the option for the other.
        url = server.url("/tiny-disk.qcow2")
        run = "head -c 8 /dev/vda; echo; echo size $(cat /sys/block/vda/size)"
        results = []
        for name, options in (
            ("url1", {"image": f"{url}?checksum=sha256:{sha}"}),
            ("url2", {"image": url, "image_checksum": f"sha256:{sha}", "primary_disk_size": 64}),
        ):
            result, console = _run_to_completion(
                plugin,
                short_tmp,
                tiny_guest,
                name,
                run,
                overrides={**options, "cloud_init": False},
            )
            results.append((result, console.decode(errors="replace")))
        gets = server.gets("/tiny-disk.qcow2")
    stream.cancel()
    for result, text in results:
        assert result.result.exit_code == 0, (result, text[-2000:])
        assert MARKER.decode() in text, text[-2000:]
    assert "size 32768" in results[0][1] and "size 131072" in results[1][1]
    # One download for both tasks, and the query's checksum never reached the server.
    assert len(gets) == 1, gets
    assert any(m.startswith("Image downloaded: http://127.0.0.1:") for m in events), events
    assert sum("Downloading image http://" in m for m in events) == 1, events
    store = ImageStore(short_tmp / "data")
    [entry] = store.entries()
    assert entry.sha256 == sha and entry.users == ()
    assert hashlib.sha256(store.blob(sha).read_bytes()).hexdigest() == sha


def test_a_bad_checksum_fails_the_start_naming_the_option(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    from tests.integration.pluginkit import tiny_task

    with image_server() as server:
        server.add("/x.raw", b"\0" * 1024 * 1024)
        options = {
            "image": server.url("/x.raw"),
            "image_checksum": "sha256:" + "0" * 64,
            "cloud_init": False,
        }
        with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="bad", overrides=options) as (
            cfg,
            _,
            alloc,
        ):
            with pytest.raises(grpc.RpcError) as failed:
                drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=60)
            assert "config.image_checksum" in str(failed.value.details())
            assert list((alloc / "tiny").glob("nomad-vm-*")) == []
    store = ImageStore(short_tmp / "data")
    assert store.entries() == []
    assert list(store.root.glob("leases/*/*")) == []
    assert list((short_tmp / "data").glob("journal/*")) == []


def test_a_plugin_killed_mid_download_leaves_a_lease_the_next_destroy_releases(
    plugin: PluginProcess,
    short_tmp: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """SIGKILL while the image downloads: the task's journal names its lease, so a fresh
    plugin's DestroyTask (which knows the task only by id) releases it; the partial download
    stays, and the next start continues it (Range) and boots."""
    import threading

    from tests.conftest import wait_until
    from tests.integration.pluginkit import DRIVER, configure, tiny_task

    data = bytes(range(256)) * 4096 * 4  # 4 MiB, raw
    data = MARKER + data[len(MARKER) :]
    with image_server() as server:
        sha = server.add("/slow.raw", data)
        pace = threading.Event()
        server.behaviour.pace = pace
        # The first MiB goes out, then the server holds the rest until told.
        server.behaviour.free_bytes = 1024 * 1024
        options = {
            "image": server.url("/slow.raw"),
            "image_checksum": f"sha256:{sha}",
            "cloud_init": False,
        }
        outcome: list[object] = []
        with tiny_task(plugin, short_tmp, tiny_guest, alloc_name="killed", overrides=options) as (
            cfg,
            _,
            alloc,
        ):

            def start() -> None:
                try:
                    outcome.append(drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg)))
                except grpc.RpcError as exc:
                    outcome.append(exc)

            starter = threading.Thread(target=start, daemon=True)
            starter.start()
            assert server.held.wait(30)
            store = ImageStore(short_tmp / "data")
            # What the server sent is in the partial file (the plugin writes as it receives).
            partial = store.partial(sha)
            assert wait_until(
                lambda: partial.exists() and partial.stat().st_size >= 1024 * 1024, 30
            )
            leases = list(store.root.glob("leases/*/*"))
            assert len(leases) == 1 and leases[0].read_text() == cfg.id
            assert plugin.process is not None
            plugin.process.kill()
            assert plugin.wait_exit(10) is not None
            starter.join(30)
            assert isinstance(outcome[0], grpc.RpcError), outcome

            second = PluginProcess([str(DRIVER)])
            second.start(short_tmp / "plugin2.stderr")
            try:
                configure(second, short_tmp / "data", [str(tiny_guest.vmlinux.parent)])
                drv(second).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
                assert list(store.root.glob("leases/*/*")) == []
                assert list((alloc / "tiny").glob("nomad-vm-*")) == []
                assert list((short_tmp / "data").glob("journal/*")) == []
                kept = store.partial(sha).stat().st_size
                pace.set()
                result, console = _run_to_completion(
                    second,
                    short_tmp,
                    tiny_guest,
                    "after",
                    "head -c 8 /dev/vda; echo",
                    overrides=options,
                )
            finally:
                second.kill()
        assert server.gets("/slow.raw")[-1].range == f"bytes={kept}-"
    assert result.result.exit_code == 0 and MARKER in console, console[-2000:]
