# seed: 000 202-241
# Seed 000, "Configuration" > "Driver Configuration": the client config the ch agent of
# test_seed_000_ch.py loads (its network block serves the jobs' br0).
# sub: "/usr/bin/cloud-hypervisor" -> "@BIN_DIR@/cloud-hypervisor": no CH on this machine; the tasks run on QEMU
# sub: "/usr/bin/ch-remote" -> "@BIN_DIR@/ch-remote"
# sub: "/usr/bin/virtiofsd" -> "@BIN_DIR@/virtiofsd"
# sub: "/boot/vmlinuz" -> "@BOOT@/vmlinuz"
# sub: "/boot/initramfs.img" -> "@BOOT@/initramfs.img"
# sub: "/usr/share/qemu/OVMF.fd" -> "@BOOT@/OVMF.fd"
# sub: "/var/log/cloud-hypervisor.log" -> "@LOG@"
# sub: "/opt/nomad/data" -> "@DATA_DIR@": the plugin's data_dir, in the test's directory
# sub: "/var/lib/images" -> "@IMAGES@"
# sub: "/opt/vm-images" -> "@IMAGES2@"
# sub: "/mnt/shared-storage" -> "@IMAGES3@"

plugin "nomad-driver-ch" {
  config {
    # Cloud Hypervisor binaries
    cloud_hypervisor {
      bin = "@BIN_DIR@/cloud-hypervisor"           # Cloud Hypervisor binary path
      remote_bin = "@BIN_DIR@/ch-remote"           # ch-remote binary path
      virtiofsd_bin = "@BIN_DIR@/virtiofsd"        # virtiofsd binary path
      default_kernel = "@BOOT@/vmlinuz"            # Default kernel for VMs
      default_initramfs = "@BOOT@/initramfs.img"   # Default initramfs for VMs
      firmware = "@BOOT@/OVMF.fd"        # UEFI firmware (optional)
      seccomp = "true"                            # Enable seccomp filtering
      log_file = "@LOG@" # VM log file path
    }

    # Network configuration
    network {
      bridge = "br0"                      # Bridge interface name
      subnet_cidr = "192.168.1.0/24"      # Subnet for VMs
      gateway = "192.168.1.1"             # Gateway IP address
      ip_pool_start = "192.168.1.100"     # IP pool start range
      ip_pool_end = "192.168.1.200"       # IP pool end range
      tap_prefix = "tap"                  # TAP interface prefix
    }

    # VFIO device passthrough (not yet implemented)
    # vfio {
    #   allowlist = ["10de:*", "8086:0d26"]  # PCI device allowlist
    #   iommu_address_width = 48              # IOMMU address width
    #   pci_segments = 1                      # Number of PCI segments
    # }

    # Security and paths
    data_dir = "@DATA_DIR@"              # Nomad data directory
    image_paths = [                           # Allowed image paths
      "@IMAGES@",
      "@IMAGES2@",
      "@IMAGES3@"
    ]
  }
}
