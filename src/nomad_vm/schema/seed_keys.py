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
    "nomad-driver-virt's storage pools, accepted as written and reported in the node "
    "attribute `driver.<name>.storage_pools`. Directory pools hold named volumes that "
    "outlive tasks (see `disk.pool`, `disk.name`, `disk.source.volume`); the plugin creates "
    "a missing pool directory (0700) and refuses one that is not its own (a symlink, another "
    "owner, writable by group or others). Ceph pools hold RBD images, managed through the "
    "Ceph bindings and opened by QEMU's rbd driver (Debian's `qemu-block-extra`); no "
    "ceph.conf is read. The node attribute `driver.<name>.storage_pools.ceph` says whether "
    "this node can use them.",
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
                Field(
                    "hosts",
                    "list(string)",
                    "Ceph monitors, each `host:port` (3300: msgr2, 6789: v1).",
                    default=[],
                ),
                Field(
                    "authentication",
                    "block",
                    "Ceph client credentials.",
                    fields=(
                        Field("username", "string", "Ceph client name."),
                        Field(
                            "secret",
                            "string",
                            "Ceph client key (base64, as `ceph auth get-key` prints it). "
                            "Never logged nor put on a command line: QEMU reads it from a "
                            "sealed memfd it inherits.",
                        ),
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
    "nomad-driver-ch's OS variant, here one switch for guests that need other settings than "
    "a Linux cloud guest. The Windows family (`windows`, `win10`, `win11`, `win2k16`, "
    "`win2k19`, `win2k22`, `win2k25`; osinfo's short ids) sets, wherever the task does not "
    'set them itself: `os { machine = "q35" }`, `firmware = "uefi-secure"`, `tpm = true`, '
    '`hyperv = true`, `rtc = "localtime"`, `bus_type = "sata"` for disks that name no bus, '
    '`network_interface { model = "e1000e" }`, `display = "vga"`, and the seed ISO as a SATA '
    "CD-ROM. A Linux distribution's osinfo id (`ubuntu20.04`, `debian12`, `rhel9.4`, ...: "
    "nomad-driver-ch's Linux variants) is accepted and changes nothing: Linux cloud guests "
    "need no switch. Any other value is refused naming `os.variant`.",
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
    "The task's disks, in nomad-driver-virt's syntax (repeat the block for each disk). Each "
    "is made in the task's runtime dir when it starts and removed with it: a copy of "
    "`source.image` (or a qcow2 overlay on it with `chained`), or an empty disk of `size`. "
    "The primary disk (the one marked, else the first) is the boot disk, `/dev/vda` on "
    "virtio; the others follow in order. A task uses either `disk` blocks or the shorthand "
    "`image`/`use_thin_copy`/`primary_disk_size` (one primary disk), not both. Every source "
    "image follows the rules of `image` (inside `image_paths` or the allocation directory, "
    "its backing chain checked, qcow2 checked). More than one disk, buses other than "
    "virtio, cdroms, devname, read_only, driver and pools need the qemu hypervisor.",
    fields=(
        Field(
            "size",
            "string",
            "Size: bytes, or a number with a unit (`20GB` = 20*1000^3, `10GiB` = 10*1024^3; "
            "`G` = GiB), rounded up to a whole MiB. Required without a source; with one it "
            "grows the copy (a disk never shrinks).",
            default="",
        ),
        Field("primary", "bool", "The boot disk (at most one; default: the first).", default=False),
        Field(
            "chained",
            "bool",
            "A qcow2 overlay on the source image (created in milliseconds; the image is "
            "never written). `false`: a full copy.",
            default=False,
        ),
        Field(
            "sparse",
            "bool",
            "`false` reserves an empty disk's space up front (preallocation=falloc). Disks "
            "made from a source are always sparse (`false` with a source is an error).",
            default=True,
        ),
        Field(
            "read_only",
            "bool",
            "The guest cannot write the disk (the VMM gets a read-only descriptor). On virtio "
            "and scsi only: QEMU's IDE disk (sata, ide) has no write protection, so a "
            "read-only one is refused (a cdrom is read-only on any bus).",
            default=False,
        ),
        Field(
            "bus_type",
            "string",
            "`virtio` (virtio-blk), `sata` (ide-hd on an AHCI controller, at most 6), `scsi` "
            "(scsi-hd on virtio-scsi) or `ide` (the pc machine's IDE bus, at most 4; q35 and "
            "microvm have none). Unset: `sata` with a Windows `os.variant` (also for the "
            "`image` shorthand's disk), else `virtio`.",
            default="",
        ),
        Field(
            "devname",
            "string",
            "The disk's serial number (1 to 20 letters, digits, `.`, `_`, `-`): a stable name "
            "in the guest, e.g. `/dev/disk/by-id/virtio-<devname>` on virtio and "
            "`/sys/block/vdX/serial` (an `ata-...<devname>` link on sata and ide, "
            "`scsi-...<devname>` on scsi). Kernel names (`vdb`) follow the order of the blocks.",
            default="",
        ),
        Field("format", "string", "The disk's format: `qcow2` (default) or `raw`.", default=""),
        Field(
            "kind",
            "string",
            "`disk` (default) or `cdrom` (read-only, ide-cd or scsi-cd: needs bus_type sata, "
            "scsi or ide, and a source image).",
            default="",
        ),
        Field(
            "driver",
            "string",
            "QEMU cache mode: `writeback` (default: the guest sees a write cache and flushes "
            "it), `writethrough` (every write flushed) or `unsafe` (flushes ignored); also "
            "written `cache=<mode>`. `none` and `directsync` need O_DIRECT, which QEMU cannot "
            "set on the descriptor it is handed: refused.",
            default="",
        ),
        Field(
            "pool",
            "string",
            "A storage pool of the plugin's `storage_pools`. With `source.image`, the image "
            "is first written into the pool as a volume (`<image>-<hash>.qcow2` in a "
            "directory pool, RBD image `<image>-<hash>` in a Ceph pool) that later tasks with "
            "the same source reuse, and the disk is made from that volume. Defaults to the "
            "default pool (as in nomad-driver-virt; CD-ROMs stay with the task); without "
            "`storage_pools` disks live with the task. A directory pool's disk file (not "
            "`name`d) is in the task's runtime directory and goes with the task. In a Ceph "
            "pool the disk is an RBD image (raw) that QEMU opens itself: the task's own "
            "image is removed with the task, a `name`d one is kept; `chained` "
            "disks are clones of a protected snapshot.",
            default="",
        ),
        Field(
            "name",
            "string",
            "nomad-vm: the disk is the pool volume of this name (one path component), which "
            "outlives the task: created from the source or empty of `size` when missing, used "
            "as it is when it exists (in the block's `format`, never detected), so the next "
            "task naming it sees what the guest wrote. Volume names are shared by every job "
            "on the node (in a Ceph pool: by every node using that pool). In a Ceph pool it "
            "is the RBD image of that name; one a running VM holds open is refused.",
            default="",
        ),
        Field(
            "volume",
            "string",
            "A group `volume` backing the disk (qemu only). The task mounts it with a "
            "`volume_mount`, which becomes the disk instead of a shared directory: Nomad "
            "2.0.1+ names the mount's volume; on Nomad before 2.0.1 give the volume_mount a "
            'destination ending in the volume\'s name (e.g. `destination = "/volumes/<name>"`). '
            "A file or block device at the volume's host path is the disk (format: `format` or "
            "`source.format`, else detected; a backing file must lie in the allowed places); "
            'a directory holds it as `nomad-vm-disk.qcow2` (`.raw` with `format = "raw"`), '
            "made of `size` on first use (no symlink there is followed) and reused afterwards. "
            "The disk is the volume's data: never removed by nomad-vm. A read-only "
            "volume_mount gives a read-only disk. Not with `pool`, `name`, `chained` or a "
            "`source` image or volume.",
            default="",
        ),
        Field(
            "source",
            "block",
            "Where the disk's content comes from.",
            fields=(
                Field(
                    "image",
                    "string",
                    "An image file or URL (rules of `image`).",
                    default="",
                ),
                Field(
                    "checksum",
                    "string",
                    "The sha256 of an `image` given by URL (rules of `image_checksum`).",
                    default="",
                ),
                Field(
                    "volume",
                    "string",
                    "A volume of the pool to clone (a full copy; `chained`: a qcow2 overlay "
                    "on it, which must then not change while overlays use it; in a Ceph pool "
                    "a clone of a protected snapshot of it taken for the task).",
                    default="",
                ),
                Field(
                    "format",
                    "string",
                    "The source's format. An image's is detected when unset; a pool volume's "
                    "is never detected (a guest may have written its first bytes): unset "
                    "means qcow2, so give `raw` for a raw volume.",
                    default="",
                ),
            ),
        ),
    ),
    repeated=True,
)

TASK_SEED_FIELDS = (USB_DEVICES, VFIO_DEVICES, DISK)
