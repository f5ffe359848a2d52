"""The plugin's `network {}` block as typed values: the bridge and its address pool."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from pathlib import Path

from nomad_vm.errors import ConfigError, HypervisorError
from nomad_vm.executables import find_executable
from nomad_vm.network.dhcp import DNSMASQ
from nomad_vm.network.ipam import AddressPool
from nomad_vm.network.names import DEFAULT_TAP_PREFIX, tap_name

SBIN_DNSMASQ = Path("/usr/sbin") / DNSMASQ


@dataclass(frozen=True)
class BridgeNetwork:
    bridge: str
    subnet: IPv4Network
    gateway: IPv4Address
    pool_start: IPv4Address
    pool_end: IPv4Address
    tap_prefix: str = DEFAULT_TAP_PREFIX
    create_bridge: bool = False
    nat: bool = False
    # DHCP mode (``dhcp = true``): the dnsmasq that tells guests their addresses; None: off.
    dnsmasq: Path | None = None

    @property
    def gateway_cidr(self) -> str:
        return f"{self.gateway}/{self.subnet.prefixlen}"

    def pool(self, state_dir: Path) -> AddressPool:
        """The bridge's leases, kept in ``state_dir`` (the plugin's data_dir/network)."""
        path = state_dir / f"leases-{self.bridge}.json"
        return AddressPool(path, self.subnet, self.gateway, self.pool_start, self.pool_end)


def parse_bridge_network(values: Mapping[str, object], data_dir: Path) -> BridgeNetwork | None:
    """The validated block, or None when no subnet is set (bridge networking unavailable)."""
    subnet_text = str(values.get("subnet_cidr") or "")
    if not subnet_text:
        return None
    subnet = _network(subnet_text, "config.network.subnet_cidr")
    hosts = (subnet.network_address + 1, subnet.broadcast_address - 1)
    gateway = _address(values.get("gateway"), "config.network.gateway", hosts[0])
    start = _address(values.get("ip_pool_start"), "config.network.ip_pool_start", gateway + 1)
    end = _address(values.get("ip_pool_end"), "config.network.ip_pool_end", hosts[1])
    net = BridgeNetwork(
        bridge=str(values.get("bridge") or "nomadvm0"),
        subnet=subnet,
        gateway=gateway,
        pool_start=start,
        pool_end=end,
        tap_prefix=str(values.get("tap_prefix") or DEFAULT_TAP_PREFIX),
        create_bridge=bool(values.get("create_bridge")),
        nat=bool(values.get("nat")),
        dnsmasq=find_dnsmasq(values.get("dnsmasq_binary")) if values.get("dhcp") else None,
    )
    # The same checks StartTask would make, so a bad block fails at SetConfig, naming the field.
    tap_name(net.tap_prefix, "check")
    net.pool(data_dir / "network")
    _check_gateway_outside_pool(net)
    return net


def _check_gateway_outside_pool(net: BridgeNetwork) -> None:
    """The pool is for VMs and the gateway is the bridge's own address: one address cannot be
    both. The pool would skip it, but a block that says both is a typo or a misunderstanding
    (e.g. a pool meant to start after the gateway), so it is refused rather than repaired."""
    gateway, start, end = net.gateway, net.pool_start, net.pool_end
    if not start <= gateway <= end:
        return
    if gateway == start and gateway < end:
        fix = f'start the pool after it (ip_pool_start = "{gateway + 1}")'
    elif gateway == end and gateway > start:
        fix = f'end the pool before it (ip_pool_end = "{gateway - 1}")'
    else:
        fix = "give the gateway an address outside ip_pool_start..ip_pool_end, or narrow the range"
    raise ConfigError(
        "config.network.gateway",
        f"{gateway} is inside the address pool {start}-{end} (network.ip_pool_start to "
        "network.ip_pool_end), whose addresses are handed to VMs, but the gateway is the "
        f"bridge's own address; {fix}",
    )


def find_dnsmasq(configured: object) -> Path:
    """dnsmasq for ``dhcp = true``: the configured path or name, else on PATH or in /usr/sbin
    (where Debian's dnsmasq-base puts it, often not on a service's PATH)."""
    name = str(configured or "").strip()
    hint = "install dnsmasq-base (Debian) or set network.dnsmasq_binary"
    try:
        label = "network.dnsmasq_binary"
        return find_executable(name, DNSMASQ, label, hint, fallbacks=(SBIN_DNSMASQ,))
    except HypervisorError as exc:
        field = "config.network.dnsmasq_binary" if name else "config.network.dhcp"
        raise ConfigError(field, f"DHCP mode needs dnsmasq: {exc}") from None


def _network(text: str, field: str) -> IPv4Network:
    try:
        net = ip_network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(
            field, f"{text!r} is not an IPv4 network like 10.89.0.0/24: {exc}"
        ) from None
    if not isinstance(net, IPv4Network):
        raise ConfigError(field, f"{text!r}: only IPv4 subnets are supported")
    return net


def _address(value: object, field: str, default: IPv4Address) -> IPv4Address:
    if value in (None, ""):
        return default
    return parse_ipv4(str(value), field)


def parse_ipv4(text: str, field: str) -> IPv4Address:
    try:
        address = ip_address(text)
    except ValueError:
        raise ConfigError(field, f"{text!r} is not an IPv4 address") from None
    if not isinstance(address, IPv4Address):
        raise ConfigError(field, f"{text!r}: only IPv4 addresses are supported")
    return address


NIC_FIELD = "config.network_interface"


@dataclass(frozen=True)
class NicRequest:
    """A task's `network_interface { bridge { ... } }`: what it asks of the plugin's bridge."""

    bridge: str
    ports: tuple[str, ...] = ()
    static_ip: IPv4Address | None = None
    gateway: IPv4Address | None = None
    prefixlen: int | None = None
    dns: tuple[IPv4Address, ...] = ()
    vlan: int | None = None


@dataclass(frozen=True)
class MacvtapRequest:
    """A task's `network_interface { macvtap { ... } }`: a macvtap on a host interface. No
    bridge or pool of ours: the address is ``static_ip`` or what the device's network serves by
    DHCP."""

    device: str
    mode: str = "bridge"
    static_ip: IPv4Address | None = None
    gateway: IPv4Address | None = None
    prefixlen: int | None = None
    dns: tuple[IPv4Address, ...] = ()


def parse_nic(block: Mapping[str, object] | None) -> NicRequest | MacvtapRequest | None:
    if not block:
        return None
    bridge = block.get("bridge")
    macvtap = block.get("macvtap")
    if isinstance(bridge, Mapping) and isinstance(macvtap, Mapping):
        raise ConfigError(
            f"{NIC_FIELD}.macvtap",
            f"{NIC_FIELD}.bridge and {NIC_FIELD}.macvtap are both set: one interface is one "
            "kind, keep one of them",
        )
    if isinstance(macvtap, Mapping):
        return _parse_macvtap(block, macvtap)
    if not isinstance(bridge, Mapping):
        raise ConfigError(NIC_FIELD, "needs a bridge { ... } or a macvtap { ... } block")
    field = f"{NIC_FIELD}.bridge"
    static = bridge.get("static_ip")
    gateway = bridge.get("gateway")
    vlan = block.get("vlan")
    return NicRequest(
        bridge=str(bridge.get("name") or ""),
        ports=tuple(str(p) for p in bridge.get("ports") or ()),
        static_ip=parse_ipv4(str(static), f"{field}.static_ip") if static else None,
        gateway=parse_ipv4(str(gateway), f"{field}.gateway") if gateway else None,
        prefixlen=_prefixlen(bridge.get("netmask"), f"{field}.netmask"),
        dns=tuple(
            parse_ipv4(str(d), f"{field}.dns[{i}]") for i, d in enumerate(bridge.get("dns") or ())
        ),
        vlan=int(vlan) if isinstance(vlan, int) and not isinstance(vlan, bool) else None,
    )


def _prefixlen(value: object, field: str) -> int | None:
    """``24`` or ``255.255.255.0``."""
    if not value:
        return None
    text = str(value).lstrip("/")
    try:
        return IPv4Network(f"0.0.0.0/{text}").prefixlen
    except ValueError:
        raise ConfigError(field, f"{value!r} is not a netmask (255.255.255.0 or 24)") from None


def _parse_macvtap(block: Mapping[str, object], macvtap: Mapping[str, object]) -> MacvtapRequest:
    field = f"{NIC_FIELD}.macvtap"
    if block.get("vlan") is not None:
        raise ConfigError(
            f"{NIC_FIELD}.vlan",
            "cannot be set with macvtap: the VLAN is the lower device's (name a VLAN interface "
            "such as eth0.100 as the device)",
        )
    if macvtap.get("ports"):
        raise ConfigError(
            f"{field}.ports",
            "a macvtap has no port forwarding: the guest has its own address on the device's "
            "network, so reach its ports there (remove ports, or use network_interface.bridge)",
        )
    device = str(macvtap.get("device") or "")
    if not device:
        raise ConfigError(f"{field}.device", "is required: the host interface to stack on")
    static = macvtap.get("static_ip")
    gateway = macvtap.get("gateway")
    prefixlen = _prefixlen(macvtap.get("netmask"), f"{field}.netmask")
    if static and prefixlen is None:
        raise ConfigError(
            f"{field}.netmask",
            "is required with static_ip: macvtap has no subnet of the plugin's to take it from",
        )
    if gateway and not static:
        raise ConfigError(
            f"{field}.gateway",
            "only goes with static_ip: without it the guest takes its route from DHCP",
        )
    return MacvtapRequest(
        device=device,
        mode=str(macvtap.get("mode") or "bridge"),
        static_ip=parse_ipv4(str(static), f"{field}.static_ip") if static else None,
        gateway=parse_ipv4(str(gateway), f"{field}.gateway") if gateway else None,
        prefixlen=prefixlen,
        dns=tuple(
            parse_ipv4(str(d), f"{field}.dns[{i}]") for i, d in enumerate(_items(macvtap, "dns"))
        ),
    )


def _items(block: Mapping[str, object], key: str) -> list[object]:
    value = block.get(key)
    return list(value) if isinstance(value, list | tuple) else []
