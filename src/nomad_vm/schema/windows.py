"""Task options for guests that are not cloud-init Linux (Windows, seed 004): each piece of
what `os { variant = "windows" }` switches on, also settable alone (driver/guest_profile.py)."""

from __future__ import annotations

from nomad_vm.fields import Field

NIC_MODELS = ("virtio", "e1000e")
RTC_BASES = ("utc", "localtime")

WINDOWS_FIELDS = (
    Field(
        "tpm",
        "bool",
        "Give the VM a TPM 2.0 (`tpm-crb`), emulated by one `swtpm` per task (Debian package "
        "`swtpm`) running as `vm_user`. Its state (keys, NV storage, counters) is kept in the "
        "task's directory (`<task dir>/nomad-vm-tpm/`), so a restart of the task in the same "
        "allocation finds it again; it goes with the allocation. Unset: on for a Windows "
        "`os.variant`. QEMU only, not on `microvm`.",
    ),
    Field(
        "hyperv",
        "bool",
        "Hyper-V enlightenments (QEMU's recommended set: `hv-relaxed`, `hv-vapic`, "
        "`hv-spinlocks`, `hv-vpindex`, `hv-runtime`, `hv-time`, `hv-synic`, `hv-stimer`, "
        "`hv-frequencies`, `hv-tlbflush`, `hv-ipi`). KVM implements them: under TCG all are "
        "dropped and a task event says which. Unset: on for a Windows `os.variant`. QEMU only.",
    ),
    Field(
        "rtc",
        "string",
        "What the guest's hardware clock keeps: `utc` (what Linux expects) or `localtime` "
        "(the host's local time, what Windows expects). Unset: `localtime` for a Windows "
        "`os.variant`, else `utc`.",
        choices=RTC_BASES,
    ),
)

NIC_MODEL = Field(
    "model",
    "string",
    "The network card the guest sees: `virtio` (virtio-net) or `e1000e` (an Intel 82574L, "
    "which guests without virtio drivers, such as Windows Setup, can use). Unset: `e1000e` "
    "for a Windows `os.variant`, else `virtio`. QEMU only (not on `microvm`).",
    choices=NIC_MODELS,
)

SEED_FILES = Field(
    "seed_files",
    "list(string)",
    "Files put at the root of the VM's seed ISO under their own names, for guests provisioned "
    "by something other than cloud-init: Windows Setup's `autounattend.xml` (it searches the "
    "root of removable media), or cloudbase-init files. Same path rules as `image` (a Nomad "
    "`template` in `local/` works). The ISO is attached even with `cloud_init = false`; with "
    "a Windows `os.variant` it is a SATA CD-ROM, which Windows reads without virtio drivers. "
    "Names must be unique and cannot be `meta-data`, `user-data` or `network-config`; at "
    "most 16 files, 8 MiB in all.",
    default=[],
    example='["local/autounattend.xml"]',
)
