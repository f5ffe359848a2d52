"""Keys of the seed drivers (nomad-driver-virt, nomad-driver-ch) that nomad-vm accepts as
written without acting on them yet: each is either ignored with a logged warning and a node
attribute (libvirt's connection, which nomad-vm has no use for), or refused with an error that
says it is not supported yet when a task relies on it. None is dropped silently."""

from __future__ import annotations

from nomad_vm.fields import Field

NOT_YET = "Not supported yet: "

_LIBVIRT_FIELDS = (
    Field("uri", "string", "libvirt connection URI (ignored).", default=""),
    Field("user", "string", "libvirt user (ignored).", default=""),
    Field("password", "string", "libvirt password (ignored).", default=""),
)

PLUGIN_DNS = Field(
    "dns",
    "list(string)",
    "Name servers (IPv4) for guests whose `network_interface.bridge` sets no `dns`: written "
    "into their cloud-init network-config, or handed out by the DHCP mode's dnsmasq. Unset: "
    "such guests get none.",
    default=[],
    example='["192.0.2.53"]',
)

PROVIDER = Field(
    "provider",
    "block",
    'nomad-driver-virt\'s `provider "libvirt" { uri, user, password }`. Accepted so its '
    "client config loads unchanged, and ignored with a warning in the agent log and the node "
    "attribute `driver.<name>.libvirt`: nomad-vm runs QEMU directly, without libvirt.",
    fields=_LIBVIRT_FIELDS,
    labeled=True,
)

EMULATOR = Field(
    "emulator",
    "block",
    "nomad-driver-virt's older `emulator { uri, user, password }`: accepted and ignored like "
    "`provider`.",
    fields=_LIBVIRT_FIELDS,
)

STORAGE_POOLS = Field(
    "storage_pools",
    "block",
    "nomad-driver-virt's storage pools, accepted as written. "
    + NOT_YET
    + "the pools are checked and reported (node attribute `driver.<name>.storage_pools`, a "
    "warning in the agent log), and a task whose `disk` names a pool is refused.",
    fields=(
        Field("default", "string", "Name of the default pool.", default=""),
        Field(
            "directory",
            "block",
            "A directory pool: volumes in a host directory.",
            fields=(Field("path", "string", "Absolute host path holding the volumes."),),
            labeled=True,
        ),
        Field(
            "ceph",
            "block",
            "A Ceph RBD pool.",
            fields=(
                Field("pool", "string", "The Ceph pool."),
                Field("hosts", "list(string)", "Ceph monitors (`host:port`).", default=[]),
                Field(
                    "authentication",
                    "block",
                    "Ceph client credentials.",
                    fields=(
                        Field("username", "string", "Ceph client name."),
                        Field("secret", "string", "Ceph client key (base64)."),
                    ),
                ),
            ),
            labeled=True,
        ),
    ),
)

VFIO = Field(
    "vfio",
    "block",
    "nomad-driver-ch's PCI passthrough settings (documented there as not implemented yet). "
    + NOT_YET
    + "accepted and reported (node attribute `driver.<name>.vfio`, a warning in the agent "
    "log); tasks' `vfio_devices` are refused.",
    fields=(
        Field("allowlist", "list(string)", "PCI `vendor:device` patterns.", default=[]),
        Field("iommu_address_width", "number", "IOMMU address width."),
        Field("pci_segments", "number", "Number of PCI segments."),
    ),
)

PLUGIN_SEED_FIELDS = (PLUGIN_DNS, PROVIDER, EMULATOR, STORAGE_POOLS, VFIO)

OS_VARIANT = Field(
    "variant",
    "string",
    "nomad-driver-ch's OS variant (e.g. `ubuntu20.04`). "
    + NOT_YET
    + "nomad-vm gives every guest the same virtio devices, so a variant would change nothing; "
    "a task that sets it is refused rather than let it believe otherwise.",
    default="",
)

USB_DEVICES = Field(
    "usb_devices",
    "list(string)",
    "nomad-driver-ch's USB passthrough (`vendor:product` IDs). "
    + NOT_YET
    + "a task that lists a device is refused (an empty list is fine).",
    default=[],
)

VFIO_DEVICES = Field(
    "vfio_devices",
    "list(string)",
    "nomad-driver-ch's PCI passthrough (`vendor:device` IDs). "
    + NOT_YET
    + "a task that lists a device is refused (an empty list is fine).",
    default=[],
)

DISK = Field(
    "disk",
    "block",
    "nomad-driver-virt's disks, accepted in its syntax (every key below). "
    + NOT_YET
    + "a task with a `disk` block is refused, naming it (and its `pool`, for storage pools); "
    "use `image`, `use_thin_copy` and `primary_disk_size` for the boot disk.",
    fields=(
        Field("size", "string", "Size: bytes, or with a unit (`10GiB`, `20GB`).", default=""),
        Field("primary", "bool", "The boot disk.", default=False),
        Field("chained", "bool", "An overlay on the source.", default=False),
        Field("sparse", "bool", "Sparsely allocated.", default=False),
        Field("read_only", "bool", "Read-only for the guest.", default=False),
        Field("bus_type", "string", "Bus (`virtio`, `sata`, `scsi`, `ide`).", default=""),
        Field("devname", "string", "Device name in the guest.", default=""),
        Field("format", "string", "Volume format.", default=""),
        Field("kind", "string", "`disk` or `cdrom`.", default=""),
        Field("driver", "string", "Disk driver (cache/io mode).", default=""),
        Field("pool", "string", "Storage pool holding the volume.", default=""),
        Field("volume", "string", "A Nomad volume backing the disk.", default=""),
        Field(
            "source",
            "block",
            "Where the disk's content comes from.",
            fields=(
                Field("image", "string", "An image file.", default=""),
                Field("volume", "string", "A volume of the pool.", default=""),
                Field("format", "string", "The source's format.", default=""),
            ),
        ),
    ),
    repeated=True,
)

MACVTAP = Field(
    "macvtap",
    "block",
    "nomad-driver-virt's macvtap interface (`device`, `mode`). "
    + NOT_YET
    + "a task with a `macvtap` block is refused, naming it; use `bridge`.",
    fields=(
        Field("device", "string", "The host device the macvtap sits on.", default=""),
        Field(
            "mode",
            "string",
            "`bridge`, `private`, `vepa` or `passthrough`.",
            default="bridge",
            choices=("bridge", "private", "vepa", "passthrough"),
        ),
    ),
)

TASK_SEED_FIELDS = (USB_DEVICES, VFIO_DEVICES, DISK)
