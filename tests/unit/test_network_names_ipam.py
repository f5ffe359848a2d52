"""Interface names, MACs and the file-backed IP pool (no root needed)."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from nomad_vm.errors import ConfigError, NetworkError
from nomad_vm.network.ipam import STATIC_FIELD, AddressPool
from nomad_vm.network.names import (
    DEFAULT_TAP_PREFIX,
    bridge_mac,
    is_owner_tag,
    mac_address,
    rule_tag,
    tap_mac,
    tap_name,
)

A = IPv4Address
SUBNET = IPv4Network("10.99.0.0/24")
GATEWAY = A("10.99.0.1")
TASK_IDS = [f"{i:08x}-5c1e-4b7a-9f00-{i:012x}/web/{i % 7:08x}" for i in range(10_000)]
MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


# -- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["n", DEFAULT_TAP_PREFIX, "nvm-tap", "A_b-1"])
def test_tap_name_fits_ifnamsiz_and_keeps_the_prefix(prefix: str) -> None:
    name = tap_name(prefix, TASK_IDS[0])
    assert len(name) == 15
    assert name.startswith(prefix)
    assert re.fullmatch(r"[a-z2-7]+", name[len(prefix) :])


def test_tap_name_is_deterministic_and_differs_per_task() -> None:
    assert tap_name("nvm", "alloc/web/1") == tap_name("nvm", "alloc/web/1")
    assert tap_name("nvm", "alloc/web/1") != tap_name("nvm", "alloc/web/2")


@pytest.mark.parametrize("prefix", [DEFAULT_TAP_PREFIX, "nvm-tap"])
def test_tap_names_are_unique_across_10k_tasks(prefix: str) -> None:
    # "nvm-tap" leaves the minimum of 8 hash characters.
    assert len({tap_name(prefix, task_id) for task_id in TASK_IDS}) == len(TASK_IDS)


def test_tap_prefix_too_long() -> None:
    with pytest.raises(ConfigError) as err:
        tap_name("nomad-vm", "t")
    assert err.value.field == "network.tap_prefix"
    assert "at most 7" in err.value.reason


@pytest.mark.parametrize("prefix", ["", "a/b", "a b", "a:b", "a.b", "1tap", "-tap", "tap%"])
def test_tap_prefix_with_invalid_characters(prefix: str) -> None:
    with pytest.raises(ConfigError) as err:
        tap_name(prefix, "t")
    assert err.value.field == "network.tap_prefix"
    assert "letter" in err.value.reason


def test_mac_address_is_unicast_locally_administered_and_deterministic() -> None:
    mac = mac_address("alloc/web/1")
    assert MAC.match(mac)
    first = int(mac[:2], 16)
    assert first & 0x01 == 0, "multicast bit set"
    assert first & 0x02 == 0x02, "not locally administered"
    assert mac.startswith("52:")
    assert mac == mac_address("alloc/web/1")
    assert mac != mac_address("alloc/web/2")


def test_mac_addresses_are_unique_across_10k_tasks() -> None:
    assert len({mac_address(task_id) for task_id in TASK_IDS}) == len(TASK_IDS)


def test_tap_and_bridge_macs_never_equal_a_guest_mac() -> None:
    guest = mac_address("alloc/web/1")
    host_end = tap_mac(guest)
    assert host_end == "fe" + guest[2:]
    assert int(host_end[:2], 16) & 0x03 == 0x02
    bridge = bridge_mac("nvmbr0")
    assert MAC.match(bridge) and bridge.startswith("02:")
    assert bridge == bridge_mac("nvmbr0") != bridge_mac("nvmbr1")
    with pytest.raises(ValueError):
        tap_mac("52:54:00:12:34")


def test_rule_tags_fit_an_nft_comment_and_are_recognised() -> None:
    long_owner = "x" * 1000
    tag = rule_tag(long_owner)
    assert len(tag) <= 128 and tag == rule_tag(long_owner)
    assert is_owner_tag(tag)
    assert not is_owner_tag("nomad-vm:bridge:nvmbr0")
    assert not is_owner_tag("something else")


# -- the address pool ------------------------------------------------------------------------


@pytest.fixture
def pool_at(tmp_path: Path) -> Callable[..., AddressPool]:
    def make(start: str = "10.99.0.10", end: str = "10.99.0.20", gateway: str = "10.99.0.1"):  # type: ignore[no-untyped-def]
        return AddressPool(tmp_path / "leases.json", SUBNET, A(gateway), A(start), A(end))

    return make


@pytest.fixture
def pool(pool_at: Callable[..., AddressPool]) -> AddressPool:
    return pool_at()


def test_allocates_in_order_from_the_start_of_the_range(pool: AddressPool) -> None:
    assert [pool.allocate(o) for o in ("a", "b", "c")] == [
        A("10.99.0.10"),
        A("10.99.0.11"),
        A("10.99.0.12"),
    ]


def test_dynamic_allocation_skips_the_gateway(pool_at: Callable[..., AddressPool]) -> None:
    pool = pool_at(start="10.99.0.1", end="10.99.0.5")
    assert pool.allocate("a") == A("10.99.0.2")


def test_the_same_owner_gets_its_lease_back(pool: AddressPool) -> None:
    first = pool.allocate("a")
    pool.allocate("b")
    assert pool.allocate("a") == first
    assert pool.allocate("a", static=first) == first
    assert len(pool.leases()) == 2


def test_static_address_outside_the_range_is_fine_and_then_skipped(pool: AddressPool) -> None:
    assert pool.allocate("s", static=A("10.99.0.200")) == A("10.99.0.200")
    assert pool.allocate("t", static=A("10.99.0.10")) == A("10.99.0.10")
    assert pool.allocate("d") == A("10.99.0.11")


def test_static_address_moves_an_existing_lease(pool: AddressPool) -> None:
    pool.allocate("a")
    assert pool.allocate("a", static=A("10.99.0.100")) == A("10.99.0.100")
    assert pool.leases() == {"a": A("10.99.0.100")}


@pytest.mark.parametrize(
    ("static", "reason"),
    [
        ("10.98.0.5", "outside the bridge subnet 10.99.0.0/24"),
        ("10.99.0.0", "network address"),
        ("10.99.0.255", "broadcast address"),
        ("10.99.0.1", "gateway"),
    ],
)
def test_static_address_validation(pool: AddressPool, static: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        pool.allocate("a", static=A(static))
    assert err.value.field == STATIC_FIELD == "config.network_interface.bridge.static_ip"
    assert reason in err.value.reason
    assert pool.leases() == {}


def test_static_address_in_use_by_another_owner(pool: AddressPool) -> None:
    taken = pool.allocate("a")
    with pytest.raises(ConfigError) as err:
        pool.allocate("b", static=taken)
    assert err.value.field == STATIC_FIELD
    assert err.value.reason == f"{taken} is already in use by another task (a)"
    assert pool.leases() == {"a": taken}


def test_exhausted_pool_names_the_range_and_the_file(pool_at: Callable[..., AddressPool]) -> None:
    pool = pool_at(start="10.99.0.10", end="10.99.0.11")
    pool.allocate("a")
    pool.allocate("b")
    with pytest.raises(NetworkError) as err:
        pool.allocate("c")
    message = str(err.value)
    assert "10.99.0.10-10.99.0.11" in message
    assert str(pool.path) in message
    assert "exhausted" in message
    # The full pool still serves its owners.
    assert pool.allocate("a") == A("10.99.0.10")


def test_release_frees_the_address_for_reuse(pool_at: Callable[..., AddressPool]) -> None:
    pool = pool_at(start="10.99.0.10", end="10.99.0.11")
    pool.allocate("a")
    pool.allocate("b")
    pool.release("a")
    pool.release("a")  # idempotent
    pool.release("never-allocated")
    assert pool.allocate("c") == A("10.99.0.10")
    assert pool.leases() == {"b": A("10.99.0.11"), "c": A("10.99.0.10")}


def test_reconcile_drops_the_leases_of_dead_owners(pool: AddressPool) -> None:
    for owner in ("a", "b", "c", "d"):
        pool.allocate(owner)
    assert pool.reconcile({"b", "d", "unknown"}) == ["a", "c"]
    assert set(pool.leases()) == {"b", "d"}
    assert pool.reconcile({"b", "d"}) == []


def test_leases_persist_in_a_versioned_json_file(
    pool: AddressPool, pool_at: Callable[..., AddressPool]
) -> None:
    pool.allocate("a")
    pool.allocate("b", static=A("10.99.0.50"))
    assert json.loads(pool.path.read_text()) == {
        "version": 1,
        "subnet": "10.99.0.0/24",
        "leases": {"a": "10.99.0.10", "b": "10.99.0.50"},
    }
    again = pool_at()
    assert again.leases() == {"a": A("10.99.0.10"), "b": A("10.99.0.50")}
    assert again.allocate("c") == A("10.99.0.11")


def test_the_file_is_replaced_whole_and_no_temporary_file_remains(pool: AddressPool) -> None:
    pool.allocate("a")
    inode = pool.path.stat().st_ino
    pool.allocate("b")
    assert pool.path.stat().st_ino != inode, "written in place instead of renamed over"
    assert sorted(p.name for p in pool.path.parent.iterdir()) == ["leases.json", "leases.json.lock"]


def test_a_failed_write_keeps_the_old_file(
    pool: AddressPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool.allocate("a")
    before = pool.path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(NetworkError, match="cannot write the IP lease file"):
        pool.allocate("b")
    monkeypatch.undo()
    assert pool.path.read_bytes() == before
    assert sorted(p.name for p in pool.path.parent.iterdir()) == ["leases.json", "leases.json.lock"]
    assert pool.leases() == {"a": A("10.99.0.10")}


def test_a_corrupt_file_is_reported_not_overwritten(pool: AddressPool) -> None:
    pool.path.write_text('{"version": 1, "leases": {"a": "not an ip"}}')
    with pytest.raises(NetworkError) as err:
        pool.allocate("b")
    assert str(pool.path) in str(err.value) and "corrupt" in str(err.value)
    assert "not an ip" in pool.path.read_text()


@pytest.mark.parametrize(
    ("subnet", "gateway", "start", "end", "field"),
    [
        ("10.99.0.0/24", "10.99.0.1", "10.98.0.10", "10.99.0.20", "network.ip_pool_start"),
        ("10.99.0.0/24", "10.99.0.1", "10.99.0.10", "10.99.1.20", "network.ip_pool_end"),
        ("10.99.0.0/24", "10.99.0.1", "10.99.0.0", "10.99.0.20", "network.ip_pool_start"),
        ("10.99.0.0/24", "10.99.0.1", "10.99.0.10", "10.99.0.255", "network.ip_pool_end"),
        ("10.99.0.0/24", "10.99.0.1", "10.99.0.20", "10.99.0.10", "network.ip_pool_end"),
        ("10.99.0.0/24", "10.98.0.1", "10.99.0.10", "10.99.0.20", "network.gateway"),
        ("10.99.0.0/24", "10.99.0.1", "10.99.0.1", "10.99.0.1", "network.ip_pool_start"),
        ("10.99.0.0/31", "10.99.0.0", "10.99.0.1", "10.99.0.1", "network.subnet_cidr"),
    ],
)
def test_constructor_validation_names_the_field(
    tmp_path: Path, subnet: str, gateway: str, start: str, end: str, field: str
) -> None:
    with pytest.raises(ConfigError) as err:
        AddressPool(tmp_path / "l.json", IPv4Network(subnet), A(gateway), A(start), A(end))
    assert err.value.field == field


# -- several processes at once ---------------------------------------------------------------

WORKERS = 8
PER_WORKER = 12


def _allocate_many(path: str, worker: int, barrier, results) -> None:  # type: ignore[no-untyped-def]
    pool = AddressPool(Path(path), SUBNET, GATEWAY, A("10.99.0.2"), A("10.99.0.254"))
    barrier.wait()
    got = [str(pool.allocate(f"w{worker}-t{i}")) for i in range(PER_WORKER)]
    results.put((worker, got))


def test_concurrent_processes_never_share_an_address(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    path = str(tmp_path / "leases.json")
    procs = [
        ctx.Process(target=_allocate_many, args=(path, w, barrier, results)) for w in range(WORKERS)
    ]
    for proc in procs:
        proc.start()
    collected = dict(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    handed_out = [ip for got in collected.values() for ip in got]
    assert len(handed_out) == WORKERS * PER_WORKER
    assert len(set(handed_out)) == len(handed_out), "an address was handed out twice"
    leases = AddressPool(Path(path), SUBNET, GATEWAY, A("10.99.0.2"), A("10.99.0.254")).leases()
    assert len(leases) == WORKERS * PER_WORKER
    assert sorted(str(ip) for ip in leases.values()) == sorted(handed_out)
    # The lowest addresses, no gaps: every process saw every other's writes.
    assert {int(ip) for ip in leases.values()} == set(
        range(int(A("10.99.0.2")), int(A("10.99.0.2")) + WORKERS * PER_WORKER)
    )
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
