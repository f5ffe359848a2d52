# seed: 000 151-179
# Seed 000, "Installation" > "4. Configure Nomad" > "Client Configuration", unchanged. Nomad
# itself refuses it: a `plugin` block belongs at the top level of an agent config, not inside
# `client {}` (s000_l202_plugin.hcl is the same driver config at the top level).

# /etc/nomad.d/client.hcl
client {
  enabled = true

  plugin "nomad-driver-ch" {
    config {
      # Cloud Hypervisor configuration
      cloud_hypervisor {
        bin = "/usr/bin/cloud-hypervisor"
        remote_bin = "/usr/bin/ch-remote"
        virtiofsd_bin = "/usr/bin/virtiofsd"
        default_kernel = "/boot/vmlinuz"
        default_initramfs = "/boot/initramfs.img"
      }

      # Network configuration
      network {
        bridge = "br0"
        subnet_cidr = "192.168.1.0/24"
        gateway = "192.168.1.1"
        ip_pool_start = "192.168.1.100"
        ip_pool_end = "192.168.1.200"
      }

      # Allowed image paths for security
      image_paths = ["/var/lib/images", "/opt/vm-images"]
    }
  }
}
