# seed: 002 127-136
# Seed 002, "Driver Configuration" > "Examples": the minimal configuration, the client config of
# test_seed_002_virt.py's agent.
# sub: "/var/lib/virt/images" -> "@IMAGES@"
# sub: "/var/lib/virt/storage" -> "@STORAGE@": the directory pool, in the test's directory
# Added (lines marked `# added`): a data_dir in the test's directory (the default is under
# /var/lib), and the plugin's network block: nomad-driver-virt attaches VMs to libvirt's own
# network (virbr0, 192.168.122.0/24); nomad-vm has no libvirt and runs that bridge itself, so
# it must be told about it. In the test it is created in the agent's network namespace.

plugin "nomad-driver-virt" {
  config {
    image_paths = ["@IMAGES@"]
    storage_pools {
      directory "local" {
        path = "@STORAGE@"
      }
    }
    data_dir = "@DATA_DIR@"  # added
    network {  # added
      bridge        = "virbr0"  # added
      subnet_cidr   = "192.168.122.0/24"  # added
      create_bridge = true  # added
    }  # added
  }
}
