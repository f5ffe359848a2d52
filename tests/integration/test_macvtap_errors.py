"""macvtap config that cannot work, through the real plugin: each refusal names its field and
leaves no link, journal or QEMU behind. Topology and fixture: test_macvtap.py."""

from __future__ import annotations

import contextlib
from typing import Any

import grpc
import pytest

from tests.integration.test_macvtap import FIELD, LOWER, Wire, macvtap_nic, served_vm, wire
from tests.netns import ip

pytestmark = pytest.mark.integration
__all__ = ["wire"]  # the fixture, used by name


@pytest.mark.parametrize(
    ("nic", "field_name", "words"),
    [
        (macvtap_nic(device="nvtmnone"), f"{FIELD}.device", "no network interface"),
        (macvtap_nic(device="lo"), f"{FIELD}.device", "loopback"),
        (macvtap_nic(mode="switch"), f"{FIELD}.mode", "must be one of"),
        (macvtap_nic(ports=["http"]), f"{FIELD}.ports", "no port forwarding"),
        (macvtap_nic(static_ip="10.97.0.9"), f"{FIELD}.netmask", "required with static_ip"),
        (macvtap_nic(device=""), f"{FIELD}.device", "required"),
        ({"bridge": {"name": "x"}, "macvtap": macvtap_nic()["macvtap"], "vlan": None},
         FIELD, "both set"),
        ({**macvtap_nic(), "vlan": 5}, "network_interface.vlan", "lower device"),
    ],
)  # fmt: skip
def test_bad_macvtap_config_names_the_field_and_leaves_nothing(
    wire: Wire, tiny_guest: Any, nic: dict[str, object], field_name: str, words: str
) -> None:
    with served_vm(wire, tiny_guest, "mvbad", nic) as (cfg, _), pytest.raises(grpc.RpcError) as err:
        wire.start(cfg)
    _invalid(err.value, field_name, words)
    wire.assert_clean()


def test_passthrough_of_a_device_in_use_is_refused_and_leaves_nothing(
    wire: Wire, tiny_guest: Any
) -> None:
    """A device that already carries a macvtap (here: another task's, in bridge mode) cannot
    be passed through; and a device held in passthrough takes no other macvtap."""
    with contextlib.ExitStack() as stack:
        first, _ = stack.enter_context(served_vm(wire, tiny_guest, "mvfirst", macvtap_nic()))
        wire.start(first)
        before = wire.macvtaps()
        second, _ = stack.enter_context(
            served_vm(wire, tiny_guest, "mvsecond", macvtap_nic(mode="passthrough"))
        )
        with pytest.raises(grpc.RpcError) as err:
            wire.start(second)
        _invalid(err.value, f"{FIELD}.mode", "in use by")
        assert wire.macvtaps() == before
        assert len(wire.journals()) == 1
        wire.destroy(first.id)

        wire.start(second)  # now free: passthrough takes it
        third, _ = stack.enter_context(served_vm(wire, tiny_guest, "mvthird", macvtap_nic()))
        with pytest.raises(grpc.RpcError) as err:
            wire.start(third)
        _invalid(err.value, f"{FIELD}.device", "passthrough mode")
        assert len(wire.macvtaps()) == 1 and len(wire.journals()) == 1
        wire.destroy(second.id)
    wire.assert_clean()


def _invalid(err: grpc.RpcError, field_name: str, words: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    details = err.details() or ""
    assert field_name in details and words in details, details


def test_passthrough_of_a_device_the_host_uses_is_refused(wire: Wire, tiny_guest: Any) -> None:
    """A device with an address of the host's: passing it through would cut the host off that
    network (every frame goes to the VM). An address in the test's namespace, not the host's."""
    ip("-n", wire.host, "addr", "add", "10.97.0.2/24", "dev", LOWER)
    nic = macvtap_nic(mode="passthrough")
    with (
        served_vm(wire, tiny_guest, "mvused", nic) as (cfg, _),
        pytest.raises(grpc.RpcError) as err,
    ):
        wire.start(cfg)
    _invalid(err.value, f"{FIELD}.mode", "10.97.0.2")
    wire.assert_clean()
