"""The host side of a VM's network: building blocks, each usable inside a network namespace.

settings.py  the plugin's network block and a task's network_interface, typed
names.py   TAP names, MAC addresses and rule tags derived from the task id (pure)
ipam.py    the bridge's IPv4 leases: a JSON file under an flock, written atomically
netns.py   run a function in a named network namespace (a fresh thread that entered it)
links.py   bridges and links over netlink (pyroute2)
taps.py    the VMs' TAP devices on a bridge
macvtap.py the VMs' macvtap links on a host interface, opened as /dev/tapN
nft.py     port forwards and NAT in the plugin's own nftables table (``nft -j``)
dhcp.py    DHCP mode: one dnsmasq per bridge, answering only the MACs of the driver's guests
sysctl.py  /proc/sys settings: ip_forward, route_localnet

Knows nothing about Nomad or QEMU: the driver maps task configuration onto these calls.
"""
