"""Nothing a job or plugin config says is silently dropped (issue 9), through the real plugin
process driven over gRPC as Nomad drives it: a gateway inside the address pool, cloud-init
options on a VM without a seed, a time zone the zone database does not know, a damaged qcow2,
an image crafted to exhaust qemu-img (issue 10), a second disk's source image whose backing
chain leaves the allowed directories (issue 12). Each is refused naming the field, and the
refused call leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from nomad_vm.plugin.launcher import PluginProcess
from nomad_vm.plugin.proto import base_pb2, driver_pb2
from tests.conftest import processes_under, vm_processes_under
from tests.integration.crafted_images import memory_bomb
from tests.integration.damaged_images import (
    QEMU_IMG,
    cut_in_the_data,
    header_only,
    run,
    whole_qcow2,
    zeroed_refcounts,
)
from tests.integration.pluginkit import MARKER, base, drv, plugin_config, tiny_task

pytestmark = pytest.mark.integration


def tree(path: Path) -> list[str]:
    """Every file and directory under ``path`` (relative), to compare before and after."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def refused(
    plugin: PluginProcess, cfg: driver_pb2.TaskConfig, timeout: float = 120
) -> grpc.RpcError:
    """StartTask's error. A start that succeeds (today's code for these configs) is destroyed
    before the test fails, so that it leaves no VM behind either."""
    try:
        drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=timeout)
    except grpc.RpcError as err:
        return err
    drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
    pytest.fail("StartTask accepted a config it should have refused")


def assert_nothing_left(root: Path, alloc: Path) -> None:
    """No VM or share daemon, nothing in the task dir, no runtime dir under data_dir/run."""
    assert not vm_processes_under(root)
    assert tree(alloc / "tiny") == []
    assert tree(root / "data" / "run") == []


@pytest.fixture
def images(short_tmp: Path) -> Path:
    path = short_tmp / "images"
    path.mkdir()
    return path


# -- 1. the plugin's network.gateway ---------------------------------------------------------


def network_block(**overrides: object) -> dict[str, object]:
    """The plugin's ``network`` block as Nomad sends it: every attribute, unset ones null."""
    block: dict[str, object] = {
        "bridge": "nvrefbr0",
        "subnet_cidr": "10.97.0.0/24",
        "gateway": None,
        "ip_pool_start": None,
        "ip_pool_end": None,
        "tap_prefix": "nvr",
        "create_bridge": False,
        "nat": False,
        "dhcp": False,
        "dnsmasq_binary": None,
        **overrides,
    }
    return dict(sorted(block.items()))


@pytest.mark.parametrize(
    ("network", "advice"),
    [
        ({"gateway": "10.97.0.1", "ip_pool_start": "10.97.0.1"}, 'ip_pool_start = "10.97.0.2"'),
        ({"gateway": "10.97.0.50", "ip_pool_start": "10.97.0.10"}, "outside ip_pool_start"),
    ],
)
def test_a_gateway_inside_the_pool_is_refused_at_set_config(
    plugin: PluginProcess, short_tmp: Path, network: dict[str, object], advice: str
) -> None:
    data_dir = short_tmp / "data"
    bad = plugin_config(data_dir, [], network=network_block(**network))
    with pytest.raises(grpc.RpcError) as err:
        base(plugin).SetConfig(base_pb2.SetConfigRequest(msgpack_config=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert details.startswith("config.network.gateway: "), details
    assert "inside the address pool" in details and advice in details
    assert tree(data_dir) == []  # no lease file, no directory
    # The same block with the pool after the gateway is taken.
    good = plugin_config(data_dir, [], network=network_block(gateway="10.97.0.1"))
    base(plugin).SetConfig(base_pb2.SetConfigRequest(msgpack_config=good))


# -- 2. cloud-init options on a VM without a seed ----------------------------------------------

CLOUD_INIT_ONLY: dict[str, object] = {
    "default_user_password": "hunter2hunter2",
    "default_user_authorized_ssh_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG me@laptop",
    "cmds": ["touch /tmp/never"],
    "timezone": "Europe/Berlin",
    "user_data": "#cloud-config\npackages: [nginx]\n",
}


@pytest.mark.parametrize("option", sorted(CLOUD_INIT_ONLY))
@pytest.mark.parametrize("boot", ["kernel only", "cloud_init = false"])
def test_cloud_init_options_on_a_vm_without_a_seed_are_refused(
    plugin: PluginProcess,
    short_tmp: Path,
    images: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    option: str,
    boot: str,
) -> None:
    overrides: dict[str, object] = {option: CLOUD_INIT_ONLY[option], "share_task_dirs": False}
    if boot == "cloud_init = false":
        overrides |= {"image": str(whole_qcow2(images / "disk.qcow2")), "cloud_init": False}
    paths = [str(tiny_guest.vmlinux.parent), str(images)]
    images_before = tree(images)
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="noseed", overrides=overrides, image_paths=paths
    ) as (cfg, _, alloc):
        err = refused(plugin, cfg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert details.startswith(f"config.{option}: only takes effect through cloud-init"), details
    why = (
        "cloud_init = false"
        if boot == "cloud_init = false"
        else "it boots a kernel without a disk image"
    )
    assert f"gets no cloud-init seed because {why}" in details
    assert f"remove {option}" in details
    assert "hunter2" not in details
    assert_nothing_left(short_tmp, alloc)
    assert tree(images) == images_before


# -- 3. time zones ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("timezone", "Mars/Olympus", "'Mars/Olympus' is not a time zone of the IANA"),
        ("timezone", "europe/berlin", "did you mean Europe/Berlin?"),
        ("user_data", "#cloud-config\ntimezone: Mars/Olympus\n", "line 2: timezone: 'Mars/"),
    ],
)
def test_a_time_zone_outside_the_database_is_refused(
    plugin: PluginProcess,
    short_tmp: Path,
    images: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    option: str,
    value: str,
    words: str,
) -> None:
    """On a VM that does get a seed (the tiny kernel with a disk image): the zone is checked."""
    disk = whole_qcow2(images / "disk.qcow2")
    overrides = {"image": str(disk), option: value, "share_task_dirs": False}
    paths = [str(tiny_guest.vmlinux.parent), str(images)]
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="tz", overrides=overrides, image_paths=paths
    ) as (cfg, _, alloc):
        err = refused(plugin, cfg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert details.startswith(f"config.{option}: "), details
    assert words in details
    assert_nothing_left(short_tmp, alloc)


# -- 4. damaged qcow2 images ------------------------------------------------------------------


def overlay_of_truncated_base(path: Path) -> Path:
    """A whole qcow2 overlay whose backing file is truncated: the chain is checked, not only
    the file the job names."""
    base = header_only(path.with_name("base.qcow2"))
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path)
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (header_only, "{image} is a damaged qcow2 image: qemu-img check found"),
        (cut_in_the_data, "{image} is a damaged qcow2 image: qemu-img check found"),
        (zeroed_refcounts, "{image} is a damaged qcow2 image: qemu-img check found"),
        (overlay_of_truncated_base, "backing file {images}/base.qcow2 of {image} is a damaged"),
    ],
)
@pytest.mark.parametrize("thin", [True, False])
def test_a_damaged_qcow2_is_refused_naming_the_image(
    plugin: PluginProcess,
    short_tmp: Path,
    images: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    make,  # type: ignore[no-untyped-def]
    words: str,
    thin: bool,
) -> None:
    image = make(images / "broken.qcow2")
    images_before = {p: p.read_bytes() for p in images.iterdir()}
    overrides = {"image": str(image), "use_thin_copy": thin, "share_task_dirs": False}
    paths = [str(tiny_guest.vmlinux.parent), str(images)]
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="bad", overrides=overrides, image_paths=paths
    ) as (cfg, _, alloc):
        err = refused(plugin, cfg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.details() or ""
    assert details.startswith("config.image: "), details
    assert words.format(image=image, images=images) in details, details
    assert "replace it with a whole copy" in details
    assert_nothing_left(short_tmp, alloc)
    # Only checked, never repaired: the images are exactly as they were.
    assert {p: p.read_bytes() for p in images.iterdir()} == images_before


def test_a_whole_qcow2_with_a_known_zone_starts(
    plugin: PluginProcess,
    short_tmp: Path,
    images: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """The other side of the checks above: a whole image (with a whole qcow2 backing file) and
    a zone of the database boot, twice (the second start uses the remembered verdicts)."""
    base = whole_qcow2(images / "base.qcow2")
    top = images / "top.qcow2"
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    overrides = {"image": str(top), "timezone": "Europe/Berlin", "share_task_dirs": False}
    paths = [str(tiny_guest.vmlinux.parent), str(images)]
    for name in ("good1", "good2"):
        with tiny_task(
            plugin, short_tmp, tiny_guest, alloc_name=name, overrides=overrides, image_paths=paths
        ) as (cfg, fifo, _):
            drv(plugin).StartTask(driver_pb2.StartTaskRequest(task=cfg), timeout=120)
            try:
                assert fifo.wait_for(MARKER, 120), bytes(fifo.data[-2000:])
            finally:
                drv(plugin).DestroyTask(driver_pb2.DestroyTaskRequest(task_id=cfg.id, force=True))
    assert not vm_processes_under(short_tmp)


# -- 5. an image crafted to exhaust qemu-img (issue 10) ----------------------------------------


def test_an_image_crafted_to_exhaust_qemu_img_is_refused_naming_the_image(
    plugin: PluginProcess,
    short_tmp: Path,
    images: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
) -> None:
    """1 KiB of vmdk that makes ``qemu-img info`` take 1.8 GB (and converting it, hours): under
    the driver's limits the start is refused at once, naming config.image."""
    bomb = memory_bomb(images / "bomb.vmdk")
    overrides = {"image": str(bomb), "share_task_dirs": False}
    paths = [str(tiny_guest.vmlinux.parent), str(images)]
    try:
        with tiny_task(
            plugin, short_tmp, tiny_guest, alloc_name="bomb", overrides=overrides, image_paths=paths
        ) as (cfg, _, alloc):
            err = refused(plugin, cfg, timeout=60)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        details = err.details() or ""
        assert details.startswith(
            f"config.image: qemu-img needed more than 1024 MiB of memory to read {bomb}"
        ), details
        assert "it may be crafted to exhaust the host" in details
        assert_nothing_left(short_tmp, alloc)
        assert not processes_under(short_tmp, "qemu-img")
    finally:
        # Without limits (today's code) qemu-img would still be converting it.
        for proc in processes_under(short_tmp, "qemu-img"):
            proc.kill()


# -- 6. a bad backing chain under a disk that is not the primary ------------------------------


def backing_outside(images: Path, outside: Path) -> Path:
    """A qcow2 in the allowed directory whose backing file is a host file outside it (-u:
    qemu-img never opens the backing file to write the header)."""
    evil = images / "data.qcow2"
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", outside, "-F", "raw", evil, "4M")
    return evil


def backing_through_a_symlink(images: Path, outside: Path) -> Path:
    """The same, its backing file named inside the allowed directory: a symlink out of it."""
    (images / "link.raw").symlink_to(outside)
    evil = images / "data.qcow2"
    run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-u", "-b", "link.raw", "-F", "raw", evil, "4M")
    return evil


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (backing_outside, "{image} has backing file {outside}"),
        (backing_through_a_symlink, "{image} has backing file link.raw resolves to {outside}"),
    ],
    ids=["outside", "symlink"],
)
@pytest.mark.parametrize(
    "second",
    [{}, {"chained": True}, {"pool": "local"}, {"pool": "local", "chained": True}],
    ids=["copy", "chained", "pool", "pool-chained"],
)
def test_a_second_disks_bad_backing_chain_is_refused_naming_that_disk(
    plugin: PluginProcess,
    short_tmp: Path,
    images: Path,
    tiny_guest,  # type: ignore[no-untyped-def]
    make,  # type: ignore[no-untyped-def]
    words: str,
    second: dict[str, object],
) -> None:
    """The primary disk (an empty one) is fine; the second disk's source image is a qcow2
    whose backing chain leaves the allowed directories. The start is refused naming
    config.disk[1].source.image, whether the disk is a copy, an overlay or written into a
    directory pool, and nothing is left: no VM, no task files, no pool volume; the host file
    the chain points at is never read into a disk."""
    outside = short_tmp / "host" / "secret.raw"
    outside.parent.mkdir()
    outside.write_bytes(b"SECRET!!" + bytes(4 * 1024 * 1024 - 8))
    image = make(images, outside)
    images_before = {p.name: p.read_bytes() for p in images.iterdir()}
    pool = short_tmp / "pool"
    disks = [
        {"primary": True, "size": "4MiB"},
        {"source": {"image": str(image)}, **second},
    ]
    overrides = {"disk": disks, "share_task_dirs": False, "cloud_init": False}
    paths = [str(tiny_guest.vmlinux.parent), str(images)]
    options = {"storage_pools": {"directory": {"local": {"path": str(pool)}}}}
    with tiny_task(
        plugin, short_tmp, tiny_guest, alloc_name="chain", overrides=overrides,
        image_paths=paths, plugin_options=options,
    ) as (cfg, _, alloc):  # fmt: skip
        err = refused(plugin, cfg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    details = err.details() or ""
    assert details.startswith("config.disk[1].source.image: "), details
    assert words.format(image=image, outside=outside) in details, details
    assert "outside the allowed directories" in details, details
    assert_nothing_left(short_tmp, alloc)
    assert tree(pool) == []  # no imported volume, no half-written one
    assert {p.name: p.read_bytes() for p in images.iterdir()} == images_before
    assert outside.read_bytes().startswith(b"SECRET!!")
