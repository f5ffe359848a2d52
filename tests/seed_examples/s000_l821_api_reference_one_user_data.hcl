# seed: 000 821-883
# Seed 000, "API Reference": as s000_l821_api_reference.hcl, with the second, inline `user_data`
# (the seed's "OR" alternative, marked `# dropped` below and left as comments) taken out so that
# HCL parses it. It then validates and plans, and a run fails at once naming what nomad-vm
# cannot honour (`usb_devices`: no USB passthrough; `os.variant`), asserted.
# sub: "/path/to" -> "@IMAGES@": the image and user data in an allowed image path

job "seed-000-l821" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
      driver = "nomad-driver-ch"  # skeleton
config {
  # Required: VM disk image path
  image = "@IMAGES@/vm-image.img"

  # Optional: VM hostname
  hostname = "my-vm-host"

  # Optional: Operating system variant
  os {
    arch    = "x86_64"        # CPU architecture
    machine = "q35"           # Machine type
    variant = "ubuntu20.04"   # OS variant
  }

  # Optional: Cloud-init user data
  user_data = "@IMAGES@/user-data.yml"  # File path
  # OR
#  user_data = <<EOF           # Inline YAML  # dropped
#  #cloud-config  # dropped
#  packages:  # dropped
#    - nginx  # dropped
#  EOF  # dropped

  # Optional: Timezone configuration
  timezone = "America/New_York"

  # Optional: Custom commands to run
  cmds = [
    "apt-get update",
    "systemctl enable nginx"
  ]

  # Optional: Default user configuration
  default_user_authorized_ssh_key = "ssh-rsa AAAAB3..."
  default_user_password = "secure-password"

  # Optional: Storage configuration
  use_thin_copy = true        # Enable thin provisioning
  primary_disk_size = 20480   # Primary disk size in MB

  # Optional: Cloud Hypervisor specific
  kernel = "/boot/custom-kernel"      # Custom kernel path
  initramfs = "/boot/custom-initrd"   # Custom initramfs path
  cmdline = "console=ttyS0 quiet"     # Kernel command line

  # Optional: Network interface configuration
  network_interface {
    bridge {
      name = "br0"                    # Bridge name (required)
      ports = ["web", "api"]          # Port labels to expose
      static_ip = "192.168.1.100"     # Static IP address
      gateway = "192.168.1.1"         # Custom gateway
      netmask = "24"                  # Subnet mask (CIDR)
      dns = ["8.8.8.8", "1.1.1.1"]   # Custom DNS servers
    }
  }

  # Optional: VFIO device passthrough (coming very soon!)
  # vfio_devices = ["10de:2204"]  # PCI device IDs

  # Optional: USB device passthrough
  usb_devices = ["046d:c52b"]   # USB vendor:product IDs
}
    }  # skeleton
  }  # skeleton
}  # skeleton
