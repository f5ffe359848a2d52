"""The task config: a job's `config { ... }` block for driver "vm"."""

from __future__ import annotations

from nomad_vm.fields import Field, Schema
from nomad_vm.schema.memory import MEMORY_FIELDS
from nomad_vm.schema.seed_keys import OS_VARIANT, TASK_SEED_FIELDS
from nomad_vm.schema.windows import NIC_MODEL, SEED_FILES, WINDOWS_FIELDS

FIRMWARES = ("bios", "uefi", "uefi-secure")
# A graphical console's display adapter (QEMU: vm/qemu/display.py), or none.
DISPLAYS = ("none", "vga", "virtio")
# The task options that only reach the guest through its cloud-init seed: set on a VM that gets
# none (no `image`, or `cloud_init = false`), they are refused rather than dropped unseen.
# `hostname` is not one: it also names the QEMU process and the VM's DHCP host entry.
CLOUD_INIT_OPTIONS = (
    "default_user_password",
    "default_user_authorized_ssh_key",
    "cmds",
    "timezone",
    "user_data",
)
NEEDS_SEED = (
    "Only through cloud-init: refused on a VM without a seed (no `image`, or `cloud_init = false`)."
)
# QEMU's machine types, and Cloud Hypervisor's one platform (it has no others).
MACHINES = ("pc", "q35", "microvm", "cloud-hypervisor")
# The hypervisor backends (nomad_vm.vm.registry has one of each name).
HYPERVISORS = ("qemu", "cloud-hypervisor")

TASK_CONFIG = Schema(
    title="Task configuration",
    where='a task\'s `config { ... }` block with `driver = "vm"` (or the seed driver name it is '
    "installed under: `virt`, `nomad-driver-ch`)",
    fields=(
        Field(
            "hypervisor",
            "string",
            "Which hypervisor runs this VM: `qemu` or `cloud-hypervisor`. Unset: the plugin's "
            "`hypervisor`. The same config gives the same VM on either wherever the hypervisor "
            "can do it; what Cloud Hypervisor cannot do (9p shares, BIOS boot of a disk, TCG, "
            "QEMU's machine types, `uefi-secure`) is an error naming the option, never a silent "
            "difference. A node where the hypervisor cannot run fails the task at once, saying "
            "why.",
            choices=HYPERVISORS,
            example='"cloud-hypervisor"',
        ),
        Field(
            "image",
            "string",
            "Boot disk image (raw or qcow2; vmdk, vdi, vhdx, vpc and qed are converted to a "
            "private qcow2). Must lie inside `image_paths` or the allocation directory (a Nomad "
            "`artifact` in `local/` works), and so must every file in its backing chain. The "
            "image itself is never written. `image` or `kernel` (or both) is required. A qcow2 "
            "image, and each qcow2 file of its chain, must pass `qemu-img check`: a truncated or "
            "corrupted one is refused (leaked clusters, wasted space only, are not). The check "
            "reads the metadata, not the data (milliseconds for a few GiB); an unchanged file "
            "is checked once per plugin process. May also be an `https://` or `http://` URL: "
            "the plugin downloads it once per node into its image cache (the plugin's "
            "`image_cache`), verifies `image_checksum`, and uses the cached image as the "
            "read-only base of the task's disk; its format is probed, never taken from the URL.",
            example='"local/debian.qcow2"',
        ),
        Field(
            "image_checksum",
            "string",
            "The sha256 of an `image` given by URL, `sha256:<64 hex digits>` (or give it in the "
            "URL, go-getter style: `?checksum=sha256:...`). Required for a URL image unless "
            "the plugin's `image_cache.checksum_required` is off.",
            example='"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"',
        ),
        Field(
            "use_thin_copy",
            "bool",
            "The task's disk is a qcow2 overlay backed by `image` (created in milliseconds, "
            "whatever the image's size): unset means `true`. With `false` the task gets its "
            "own full copy. (No schema default, so that setting it next to `disk {}` blocks "
            "can be refused.)",
        ),
        Field(
            "primary_disk_size",
            "number",
            "Size of the task's disk in MB. Grows the disk (the guest must grow its filesystem); "
            "smaller than the image's virtual size is an error.",
            minimum=1,
            example="20480",
        ),
        Field(
            "kernel",
            "string",
            "Guest kernel for direct kernel boot (an uncompressed `vmlinux` with a PVH entry, "
            "or a bzImage; UEFI firmware needs a bzImage with an EFI stub). Same path rules as "
            "`image`. With `image` too, the root filesystem is on the disk (`cmdline` says so).",
            example='"/srv/vm-images/vmlinux"',
        ),
        Field(
            "initramfs",
            "string",
            "Initial ramdisk loaded with the kernel. Same path rules as `image`.",
            example='"/srv/vm-images/initramfs.img"',
        ),
        Field(
            "cmdline",
            "string",
            "Kernel command line (direct kernel boot only). The guest console is the first "
            "serial port, so include `console=ttyS0` to see the guest in `nomad alloc logs`.",
            default="console=ttyS0",
        ),
        Field(
            "firmware",
            "string",
            "`bios` (SeaBIOS), `uefi` (OVMF, with a per-task copy of its variable store) or "
            '`uefi-secure` (OVMF with Secure Boot enforced; needs `os { machine = "q35" }`). '
            "Unset: `uefi-secure` for a Windows `os.variant`, else the plugin's "
            "`default_firmware` (`bios` unless the operator changed it). A value other than "
            "the plugin's `default_firmware` is refused when the plugin sets "
            "`allow_task_firmware = false`. "
            "Cloud Hypervisor has no BIOS: a VM with a kernel boots it directly (no firmware "
            "runs, `bios` is then only the default), a disk without a kernel needs `uefi` (the "
            "plugin's `cloud_hypervisor.firmware`), and `uefi-secure` is refused.",
            choices=FIRMWARES,
        ),
        *WINDOWS_FIELDS,
        Field(
            "display",
            "string",
            "A graphical console: `none` (unset means none: the serial console in `nomad "
            "alloc logs` is all a Linux cloud guest needs), `vga` (QEMU's standard VGA: text "
            "mode for the BIOS and kernel console, a framebuffer with drivers in every OS) or "
            "`virtio` "
            "(virtio-vga: virtio-gpu with a VGA front for firmware and early boot). QEMU's VNC "
            "server then listens on a unix socket in the task's runtime directory, never on "
            "TCP; `nomad-vm console serve` shows it in a browser to callers whose Nomad token "
            "may `alloc exec` into the allocation. Not with `microvm` (no PCI bus); Cloud "
            "Hypervisor has no display and refuses anything but `none`.",
            choices=DISPLAYS,
        ),
        *MEMORY_FIELDS,
        Field(
            "os",
            "block",
            "Guest platform.",
            fields=(
                Field(
                    "arch", "string", "Guest architecture.", default="x86_64", choices=("x86_64",)
                ),
                Field(
                    "machine",
                    "string",
                    "Machine type. QEMU: `pc`, `q35` or `microvm` (`microvm` only boots a "
                    "kernel directly, with BIOS). Cloud Hypervisor has one, `cloud-hypervisor`. "
                    "Unset: the hypervisor's own default (`pc` on QEMU).",
                    choices=MACHINES,
                ),
                OS_VARIANT,
            ),
        ),
        Field(
            "network_interface",
            "block",
            "A network card: on the plugin's bridge (`bridge`, with `network` in the plugin "
            "config), or a macvtap on a host interface (`macvtap`); one of the two. On the "
            "bridge the guest's address comes from `static_ip` or the plugin's pool and reaches "
            "the guest through cloud-init `network-config`, or by DHCP when the plugin's "
            "`network.dhcp` is on; Nomad learns it for services and checks.",
            fields=(
                Field(
                    "bridge",
                    "block",
                    "Attach to a bridge.",
                    fields=(
                        Field(
                            "name",
                            "string",
                            "The bridge; must be the plugin's `network.bridge`. Unset: that one.",
                            default="",
                        ),
                        Field(
                            "ports",
                            "list(string)",
                            "Labels of the group's `network { port ... }` blocks to forward "
                            "from the host port Nomad allocated to the guest (to the port's `to`, "
                            "else the same number).",
                            default=[],
                            example='["http"]',
                        ),
                        Field(
                            "static_ip",
                            "string",
                            "A fixed guest address inside the subnet (not the gateway, not in "
                            "use). Unset: the next free address of the pool.",
                            default="",
                        ),
                        Field(
                            "gateway",
                            "string",
                            "The guest's default route. Unset: the plugin's gateway.",
                            default="",
                        ),
                        Field(
                            "netmask",
                            "string",
                            "The guest's netmask (`255.255.255.0` or `24`). Unset: the subnet's.",
                            default="",
                        ),
                        Field(
                            "dns",
                            "list(string)",
                            "Name servers for the guest. Unset: none configured.",
                            default=[],
                        ),
                    ),
                ),
                Field(
                    "macvtap",
                    "block",
                    "Put the guest directly on a host interface's network through a macvtap "
                    "link (QEMU only). The guest's MAC derives from the task id (passthrough: "
                    "the device's own). No bridge, pool, NAT or port forwarding of the plugin's: "
                    "the guest gets its address by DHCP from that network (cloud-init "
                    "`network-config` says so), or `static_ip`. `ports` cannot be used, and the "
                    "host itself cannot reach the guest through the device (a macvtap property; "
                    "other machines on the network can). Not in the group network mode.",
                    fields=(
                        Field(
                            "device",
                            "string",
                            "The host interface the macvtap goes on (its lower device), e.g. "
                            "`eth0` or a VLAN interface `eth0.100`. Required.",
                            default="",
                            example='"eth0"',
                        ),
                        Field(
                            "mode",
                            "string",
                            "`bridge`: guests on the same device reach each other directly; "
                            "`vepa`: all traffic goes out to the switch (which must hairpin it "
                            "back for guest-to-guest traffic); `private`: guests on the same "
                            "device never reach each other; `passthrough`: the VM takes the "
                            "device alone (refused while anything else is stacked on it, or while "
                            "the host has an address on it).",
                            default="bridge",
                            choices=("bridge", "private", "vepa", "passthrough"),
                        ),
                        Field(
                            "ports",
                            "list(string)",
                            "Accepted only empty, so that a job written for the bridge form "
                            "fails clearly: a macvtap has no port forwarding (the guest has its "
                            "own address on the device's network; reach its ports there).",
                            default=[],
                        ),
                        Field(
                            "static_ip",
                            "string",
                            "A fixed guest address on the device's network (needs `netmask`). "
                            "Unset: DHCP from that network. Nomad learns a static address "
                            "for services; a DHCP one it does not know.",
                            default="",
                        ),
                        Field(
                            "gateway",
                            "string",
                            "The guest's default route, with `static_ip`. Unset: none.",
                            default="",
                        ),
                        Field(
                            "netmask",
                            "string",
                            "The guest's netmask (`255.255.255.0` or `24`), with `static_ip`.",
                            default="",
                        ),
                        Field(
                            "dns",
                            "list(string)",
                            "Name servers for the guest (with DHCP: besides the ones it serves).",
                            default=[],
                        ),
                    ),
                ),
                NIC_MODEL,
                Field(
                    "vlan",
                    "number",
                    "Put the VM's TAP in this VLAN (1-4094) on a VLAN-filtering bridge.",
                    minimum=1,
                ),
            ),
        ),
        SEED_FILES,
        Field(
            "cloud_init",
            "bool",
            "Attach a cloud-init NoCloud seed (an ISO labelled `cidata`) to VMs that boot a disk "
            "`image`. Set `false` for images without cloud-init. A VM without a seed (this "
            "`false`, or no `image`) refuses the options that only cloud-init applies: "
            + ", ".join(f"`{name}`" for name in CLOUD_INIT_OPTIONS)
            + ".",
            default=True,
        ),
        Field(
            "default_user_password",
            "string",
            "Password of the image's default user (`nomad`). Stored only as a SHA-512 crypt hash "
            "in the seed; never in argv, logs or events. " + NEEDS_SEED,
        ),
        Field(
            "default_user_authorized_ssh_key",
            "string",
            "Public SSH key(s) for the default user, one per line. " + NEEDS_SEED,
            example='"ssh-ed25519 AAAA... me@laptop"',
        ),
        Field(
            "cmds",
            "list(string)",
            "Shell commands run once, in order, at the guest's first boot (cloud-init `runcmd`). "
            + NEEDS_SEED,
            example='["systemctl enable --now nginx"]',
        ),
        Field(
            "timezone",
            "string",
            "The guest's time zone, e.g. `Europe/Berlin`: a zone of the IANA time zone "
            "database, checked at start against the host's (`/usr/share/zoneinfo`, else the "
            "`tzdata` Python package). " + NEEDS_SEED,
        ),
        Field(
            "user_data",
            "string",
            "Your own cloud-init document: inline text starting with `#cloud-config` (or a `#!` "
            "script), or the path of a file (inside `image_paths` or the allocation dir, e.g. a "
            "Nomad `template` in `local/`). Merged with the generated one by cloud-init: maps "
            "merge, lists append, the task options above win on single values; its own "
            "`timezone:` is checked like the option. See docs/cloud-init.md. " + NEEDS_SEED,
        ),
        Field(
            "signal_unit",
            "string",
            "systemd unit in the guest that `nomad alloc signal` (other than SIGTERM/SIGINT, "
            "which shut the VM down) is delivered to, with `systemctl kill`.",
            example='"nginx.service"',
        ),
        Field(
            "signal_pidfile",
            "string",
            "Path of a pidfile in the guest whose process receives `nomad alloc signal` "
            "(other than SIGTERM/SIGINT) when `signal_unit` is not set.",
            example='"/run/app.pid"',
        ),
        Field(
            "share_task_dirs",
            "bool",
            "Share the allocation's `alloc/` and the task's `local/` and `secrets/` directories "
            "with the guest (virtio-fs or 9p), mounted by cloud-init at `/alloc`, `/local` and "
            "`/secrets`. "
            "Nomad host volumes (`volume_mount`) are shared the same way at their destination.",
            default=True,
        ),
        Field(
            "writable_alloc_dir",
            "bool",
            "Let the guest write to `/alloc` (shared with the allocation's other tasks). "
            "`/local` and `/secrets` are always read-only in the guest.",
            default=False,
        ),
        Field(
            "hostname",
            "string",
            "The guest's hostname, an RFC 1123 label (letters, digits and `-`, at most 63). "
            "Default: the task name and the first 8 characters of the allocation id. It reaches "
            "the guest through cloud-init or DHCP mode (`network.dhcp`), and always names the "
            "QEMU process (`-name guest=...`), so it is accepted on VMs without cloud-init too.",
            example='"web-1"',
        ),
        *TASK_SEED_FIELDS,
    ),
)
