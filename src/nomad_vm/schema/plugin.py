"""The plugin config: the agent's `plugin "nomad-driver-vm" { config { ... } }` block."""

from __future__ import annotations

from dataclasses import replace

from nomad_vm.fields import Field, Schema
from nomad_vm.identity import OWN, Identity
from nomad_vm.schema.image_cache import IMAGE_CACHE_BLOCK
from nomad_vm.schema.ksm import KSM_BLOCK
from nomad_vm.schema.memory_hotplug import MEMORY_HOTPLUG_BLOCK
from nomad_vm.schema.seed_keys import PLUGIN_SEED_FIELDS
from nomad_vm.schema.task import HYPERVISORS

ACCELERATORS = ("auto", "kvm", "tcg")
SHARE_TRANSPORTS = ("auto", "virtiofs", "9p")
# Cloud Hypervisor's own `--seccomp` values.
CH_SECCOMP = ("true", "false", "log")

CLOUD_HYPERVISOR_BLOCK = Field(
    "cloud_hypervisor",
    "block",
    'Cloud Hypervisor, for tasks with `hypervisor = "cloud-hypervisor"` (or all tasks, with '
    "the plugin's `hypervisor`). Names as in nomad-driver-ch, whose block is accepted as "
    "written. Cloud Hypervisor runs guests on KVM only: without a usable KVM it cannot run "
    "(the node attributes `driver.vm.cloud_hypervisor.usable` and `.reason` say so), 9p "
    "shares, BIOS boot and QEMU's machine types are refused, and shares use virtio-fs.",
    fields=(
        Field(
            "bin",
            "string",
            "The `cloud-hypervisor` binary: a path, or a name looked up on PATH.",
            default="cloud-hypervisor",
            example='"/usr/bin/cloud-hypervisor"',
        ),
        Field(
            "remote_bin",
            "string",
            "Accepted for nomad-driver-ch configs and not used: the plugin speaks Cloud "
            "Hypervisor's REST API on the VM's API socket itself, it never runs `ch-remote`.",
            default="",
            example='"/usr/bin/ch-remote"',
        ),
        Field(
            "virtiofsd_bin",
            "string",
            "The virtiofsd for Cloud Hypervisor VMs (a path, or a name on PATH). Unset: the "
            "plugin's `virtiofsd_binary` and its search.",
            default="",
            example='"/usr/bin/virtiofsd"',
        ),
        Field(
            "default_kernel",
            "string",
            "Kernel for Cloud Hypervisor tasks that name no `kernel` (a `vmlinux` with a PVH "
            'entry, or a bzImage), except those with `firmware = "uefi"` and an `image` (their '
            "firmware boots the disk). A host path chosen by the operator: it need not lie in "
            "`image_paths`.",
            default="",
            example='"/boot/vmlinuz"',
        ),
        Field(
            "default_initramfs",
            "string",
            "Initramfs loaded with `default_kernel` (only with it: a task's own `kernel` comes "
            "with the task's own `initramfs`).",
            default="",
            example='"/boot/initramfs.img"',
        ),
        Field(
            "firmware",
            "string",
            "Cloud Hypervisor firmware (`CLOUDHV.fd` from edk2, or rust-hypervisor-firmware) "
            'that boots a disk image for tasks with `firmware = "uefi"` and no kernel. Unset: '
            "such tasks are refused.",
            default="",
            example='"/usr/share/cloud-hypervisor/CLOUDHV.fd"',
        ),
        Field(
            "seccomp",
            "string",
            "Cloud Hypervisor's own seccomp filters (`--seccomp`): `true` (on), `false` (off) "
            "or `log` (violations are logged, not fatal). A string, as in nomad-driver-ch.",
            default="true",
            choices=CH_SECCOMP,
        ),
        Field(
            "log_file",
            "string",
            "Where Cloud Hypervisor's own messages go, appended (every VM of the node writes "
            "to it; it is never truncated). Unset: a `cloud-hypervisor.log` in each VM's "
            "runtime directory, removed with the task.",
            default="",
            example='"/var/log/cloud-hypervisor.log"',
        ),
        Field(
            "trust_kvm",
            "bool",
            "Skip the KVM probe (a test guest run before KVM is trusted) and launch Cloud "
            "Hypervisor whenever `/dev/kvm` exists: for hosts whose KVM fools the probe. Off by "
            "default; with it on, a KVM that cannot run guests shows up as VMs that never boot.",
            default=False,
        ),
    ),
)

PLUGIN_CONFIG = Schema(
    title="Plugin configuration",
    where='the agent\'s `plugin "nomad-driver-vm" { config { ... } }` block',
    fields=(
        Field(
            "data_dir",
            "string",
            "Directory where the plugin keeps its own state: address leases, each task's "
            "journal (what its start made on the host, found again by task id after a "
            "crash), and per-task runtime files (disks, cloud-init seeds, control sockets) "
            "whose path would be too long inside the task directory. Created if missing. No "
            "job may name a file in it, and no `image_paths` entry may contain it or lie "
            "inside it. Installed under a seed driver's name the default is "
            "`/var/lib/nomad-vm-virt` or `/var/lib/nomad-vm-ch`, so two names on one node keep "
            "apart.",
            default="/var/lib/nomad-vm",
        ),
        Field(
            "image_paths",
            "list(string)",
            "Host directories that kernels, initramfs files, disk images (and their backing "
            "files) and `user_data` files may come from. The task's own allocation directory "
            "is always allowed too; the plugin's `data_dir` and the driver's runtime "
            "directories never are, even inside an allowed directory. Paths are resolved "
            "(symlinks, `..`) before the check, so a link cannot escape.",
            default=[],
            example='["/srv/vm-images"]',
        ),
        Field(
            "macvtap_devices",
            "list(string)",
            "Host interfaces a task's `network_interface { macvtap { device } }` may name. A "
            "macvtap guest sits on that interface's network with no guard of the plugin's (it "
            "can send with any address there), so list the interfaces whose networks jobs may "
            "join. Empty (the default, as with the virt driver): any interface of the host.",
            default=[],
            example='["eth1", "eth0.100"]',
        ),
        Field(
            "accelerator",
            "string",
            "`auto` uses KVM when a test guest really runs on it and TCG (software emulation) "
            "otherwise; `kvm` refuses to run when KVM is unusable; `tcg` never uses KVM.",
            default="auto",
            choices=ACCELERATORS,
        ),
        Field(
            "hypervisor",
            "string",
            "The hypervisor of tasks that set no `hypervisor` of their own. Unset: `qemu`.",
            choices=HYPERVISORS,
            example='"cloud-hypervisor"',
        ),
        Field(
            "default_firmware",
            "string",
            "The firmware of tasks that set no `firmware` (and no Windows `os.variant`): "
            "`bios`, `uefi` or `uefi-secure`. With `uefi-secure` (seed 004: every VM in UEFI "
            "with Secure Boot) tasks that name no `os.machine` also get `q35`, the machine type "
            "Secure Boot needs. Cloud Hypervisor tasks cannot run `uefi-secure`.",
            default="bios",
            choices=("bios", "uefi", "uefi-secure"),
        ),
        Field(
            "allow_task_firmware",
            "bool",
            "Whether a task may choose another `firmware` than `default_firmware` (by its own "
            "`firmware`, or through its `os.variant`). `false` refuses such a task, naming its "
            "option and both of these.",
            default=True,
        ),
        Field(
            "qemu_binary",
            "string",
            "The QEMU system emulator: a path, or a name looked up on PATH.",
            default="qemu-system-x86_64",
        ),
        Field(
            "share_transport",
            "string",
            "How Nomad's directories and volumes reach the guest: `virtiofs` (a virtiofsd per "
            "share, guest RAM shared with it; faster, full POSIX semantics), `9p` (served by "
            "QEMU itself), or `auto`: virtio-fs when a usable virtiofsd is found (the Rust "
            "daemon; QEMU's legacy C virtiofsd, Debian 12's /usr/lib/qemu/virtiofsd, is "
            "recognised and not used), 9p otherwise. The choice is in the node attribute "
            "`driver.vm.fs_transport`, and why in `driver.vm.fs_transport.reason`.",
            default="auto",
            choices=SHARE_TRANSPORTS,
        ),
        Field(
            "virtiofsd_binary",
            "string",
            "The virtiofsd to use: a path, or a name looked up on PATH. Unset: the first "
            "usable one of `virtiofsd` on PATH, `/usr/libexec/virtiofsd` and "
            "`/usr/lib/qemu/virtiofsd`. Usable means its `--help` lists every option the driver "
            "passes; a named binary that does not is an error, not a fallback to 9p.",
            default="",
            example='"/usr/libexec/virtiofsd"',
        ),
        Field(
            "vm_user",
            "string",
            "The user the VMMs (QEMU, Cloud Hypervisor) and virtiofsd run as. The plugin (root) "
            "prepares everything they need (disks, seed, sockets, the TAP) and hands it over as "
            "open descriptors, so they need no privilege and no access to the plugin's files; "
            "they keep only that user's own groups (add it to `kvm` where VMs use KVM). Cloud "
            "Hypervisor also needs `/dev/net/tun` open to it for a VM with a NIC (Debian's mode "
            "666): it attaches to the TAP by name. `make setup` and "
            "`nomad-vm install` create the default system user. A writable share is written "
            "as this user: the host directory (e.g. a host volume) must be writable by it. "
            '`"root"` runs them as root: unsafe (a guest that escapes its VMM owns the host), '
            "for hosts where the operator accepts that.",
            default="nomad-vm",
        ),
        Field(
            "cgroups",
            "bool",
            "Run each task's VMM and its helpers (virtiofsd, swtpm) in a cgroup of its own, "
            "`nomad-vm/<plugin tag>-<task hash>` (cgroup v1: in the cpu, cpuset and memory "
            "hierarchies; v2: one directory): `cpu.shares` (v1) or the converted `cpu.weight` "
            "(v2) from the task's "
            "`cpu`, `cpuset.cpus` from its reserved `cores` (else Nomad's shared cores, or the "
            "node's), and a memory "
            "limit of the guest's `memory` (or `memory_max`) plus the VMM's overhead, "
            "256 MB + 1/16 of guest RAM (+ 1024 MB under TCG: its translation cache). A host "
            "without a cgroup file system runs tasks without; a host where the plugin may not "
            "write one fails the task naming this option. The version in use is the node "
            "attribute `driver.vm.cgroups` (`v1`, `v2`, `none` or `off`). Turn off where the "
            "plugin must not manage cgroups.",
            default=True,
        ),
        Field(
            "seccomp",
            "bool",
            "QEMU filters its own system calls (`-sandbox on,obsolete=deny,"
            "elevateprivileges=deny,spawn=deny,resourcecontrol=deny`): it cannot run programs, "
            "change its user or use obsolete calls even if a guest takes it over. Turn off only "
            "to debug QEMU itself.",
            default=True,
        ),
        Field(
            "network",
            "block",
            "The bridge VMs with a `network_interface { bridge { ... } }` attach to, and the "
            "address pool they get addresses from (names as in nomad-driver-ch).",
            fields=(
                Field(
                    "bridge",
                    "string",
                    "Name of the Linux bridge the VMs' TAP devices join. Installed under a "
                    "seed driver's name: `virbr0` (nomad-driver-virt: libvirt's network, see "
                    "below) or `nomadvm-ch0`.",
                    default="nomadvm0",
                ),
                Field(
                    "subnet_cidr",
                    "string",
                    "The bridge's IPv4 subnet. Unset: VMs cannot ask for bridge networking. "
                    "Installed as nomad-driver-virt, the plugin defaults to libvirt's default "
                    "network, which that driver's jobs join: `virbr0`, `192.168.122.0/24`, "
                    "`create_bridge = true`, also when the config has no network block.",
                    default="",
                    example='"10.89.0.0/24"',
                ),
                Field(
                    "gateway",
                    "string",
                    "The bridge's own address, the guests' default route. Unset: the subnet's "
                    "first host address. Must lie outside `ip_pool_start`..`ip_pool_end` (the "
                    "pool's addresses go to VMs): a gateway inside the pool is refused when the "
                    "agent loads the plugin config.",
                    default="",
                ),
                Field(
                    "ip_pool_start",
                    "string",
                    "First address handed out to VMs without `static_ip`. Unset: the address "
                    "after the gateway.",
                    default="",
                ),
                Field(
                    "ip_pool_end",
                    "string",
                    "Last address handed out (inclusive). Unset: the subnet's last host address.",
                    default="",
                ),
                Field(
                    "tap_prefix",
                    "string",
                    "Prefix of the TAP device names (`<prefix><hash of the task>`, 15 characters "
                    "in all); 1 to 7 characters. Installed under a seed driver's name: `nvirt` "
                    "or `nch`.",
                    default="nvm",
                ),
                Field(
                    "create_bridge",
                    "bool",
                    "Create the bridge (with the gateway address) when it is missing, and bring "
                    "it up. Off: the operator's bridge must exist.",
                    default=False,
                ),
                Field(
                    "nat",
                    "bool",
                    "Masquerade the guests' traffic leaving the bridge, giving them the host's "
                    "outbound connectivity (needs IP forwarding, which the plugin turns on).",
                    default=False,
                ),
                Field(
                    "dhcp",
                    "bool",
                    "Serve DHCP on the bridge (dnsmasq, started and stopped by the plugin) for "
                    "images without cloud-init: each guest's MAC gets the address the driver "
                    "chose for it, with its gateway and DNS; other MACs get nothing. Applies "
                    "to the bridges of group network mode too.",
                    default=False,
                ),
                Field(
                    "dnsmasq_binary",
                    "string",
                    "The dnsmasq for `dhcp`: a path, or a name looked up on PATH. Unset: "
                    "`dnsmasq` on PATH, then `/usr/sbin/dnsmasq`.",
                    default="",
                ),
            ),
        ),
        CLOUD_HYPERVISOR_BLOCK,
        IMAGE_CACHE_BLOCK,
        KSM_BLOCK,
        MEMORY_HOTPLUG_BLOCK,
        *PLUGIN_SEED_FIELDS,
    ),
)


def plugin_config_schema(identity: Identity = OWN) -> Schema:
    """PLUGIN_CONFIG with the defaults of the name this plugin is installed under (its
    data_dir, bridge and TAP prefix), so Nomad fills in that name's, not `vm`'s."""
    if identity == OWN:
        return PLUGIN_CONFIG
    network = PLUGIN_CONFIG.field("network")
    defaults = identity.network_block_defaults
    network_fields = tuple(
        replace(f, default=defaults[f.name]) if f.name in defaults else f for f in network.fields
    )
    fields = tuple(
        replace(f, default=str(identity.data_dir))
        if f.name == "data_dir"
        else replace(f, fields=network_fields)
        if f.name == "network"
        else f
        for f in PLUGIN_CONFIG.fields
    )
    where = f'the agent\'s `plugin "{identity.file_name}" {{ config {{ ... }} }}` block'
    return replace(PLUGIN_CONFIG, where=where, fields=fields)
