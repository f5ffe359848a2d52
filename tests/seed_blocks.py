"""The seed drivers' client-config blocks (/work/shared/seeds), as their READMEs write them.

Each is the body of the seed's `plugin "<name>" { config { ... } }` block, copied with only host
paths substituted (``{name}`` placeholders); what each placeholder replaced is said next to it.
Where a line is added (a data_dir, so a test leaves nothing in /var/lib), the comment says so.
"""

from __future__ import annotations

from pathlib import Path

# Seed 000 (nomad-driver-ch README), "Configuration" > "Driver Configuration": the full block.
# Substituted: the cloud_hypervisor paths (/usr/bin/..., /boot/..., /usr/share/qemu/OVMF.fd,
# /var/log/cloud-hypervisor.log) -> {bin_dir}/..., {boot}/..., {log}; data_dir
# (/opt/nomad/data) -> {data_dir}; image_paths (/var/lib/images, /opt/vm-images,
# /mnt/shared-storage) -> {images}, {images2}, {images3}.
SEED_000_CH = """\
    # Cloud Hypervisor binaries
    cloud_hypervisor {{
      bin = "{bin_dir}/cloud-hypervisor"           # Cloud Hypervisor binary path
      remote_bin = "{bin_dir}/ch-remote"           # ch-remote binary path
      virtiofsd_bin = "{bin_dir}/virtiofsd"        # virtiofsd binary path
      default_kernel = "{boot}/vmlinuz"            # Default kernel for VMs
      default_initramfs = "{boot}/initramfs.img"   # Default initramfs for VMs
      firmware = "{boot}/OVMF.fd"        # UEFI firmware (optional)
      seccomp = "true"                            # Enable seccomp filtering
      log_file = "{log}" # VM log file path
    }}

    # Network configuration
    network {{
      bridge = "br0"                      # Bridge interface name
      subnet_cidr = "192.168.1.0/24"      # Subnet for VMs
      gateway = "192.168.1.1"             # Gateway IP address
      ip_pool_start = "192.168.1.100"     # IP pool start range
      ip_pool_end = "192.168.1.200"       # IP pool end range
      tap_prefix = "tap"                  # TAP interface prefix
    }}

    # VFIO device passthrough (not yet implemented)
    # vfio {{
    #   allowlist = ["10de:*", "8086:0d26"]  # PCI device allowlist
    #   iommu_address_width = 48              # IOMMU address width
    #   pci_segments = 1                      # Number of PCI segments
    # }}

    # Security and paths
    data_dir = "{data_dir}"              # Nomad data directory
    image_paths = [                           # Allowed image paths
      "{images}",
      "{images2}",
      "{images3}"
    ]"""

# Seed 001 (nomad-driver-virt README, earlier version), "Driver Configuration".
# Substituted: data_dir (/opt/ubuntu/virt_temp) -> {data_dir}; image_paths
# (/var/local/statics/images/) -> {images}.
SEED_001_VIRT = """\
    emulator {{
      uri = "qemu:///default"
    }}
    data_dir    = "{data_dir}"
    image_paths = ["{images}"]"""

# Seed 002 (nomad-driver-virt README, later version), "Examples": the full libvirt example
# (provider, two image paths, a directory and a Ceph pool). Substituted: image_paths
# (/var/lib/virt/images, /opt/custom-images) -> {images}, {images2}; the directory pool's path
# (/var/lib/virt/storage) -> {storage}; the Ceph monitors' hosts 10.0.0.2, 10.0.0.12, 10.0.0.99
# -> 127.0.0.2, 127.0.0.12, 127.0.0.99 (loopback: a task that uses the pool tries to reach
# them, and tests send nothing off the host). Added: the data_dir line (the seed has none; its
# default, /var/lib/nomad-vm-virt, is outside the test's directory).
SEED_002_VIRT = """\
provider "libvirt" {{
uri = "qemu:///system"
user = "libvirt-username"
password = "libvirt-pass"
}}
image_paths = [
"{images}",
"{images2}",
]
storage_pools {{
default = "local"
directory "local" {{
path = "{storage}"
}}
ceph "remote-storage" {{
pool = "nomad-pool"
hosts = [
"127.0.0.2:3300",
"127.0.0.12:3300",
"127.0.0.99:3300",
]
authentication {{
username = "nomad"
secret = "AQCzNMxpb6aWIxAA7YrNMSg8z5TxEvB0jsuibQ=="
}}
}}
}}
data_dir = "{data_dir}\""""


def seed_block(template: str, root: Path, images: Path) -> str:
    """``template`` with its paths under ``root`` (the first image path: ``images``)."""
    return template.format(
        bin_dir=root / "bin",
        boot=root / "boot",
        log=root / "cloud-hypervisor.log",
        data_dir=root / "data",
        images=images,
        images2=root / "images2",
        images3=root / "images3",
        storage=root / "storage",
    )
