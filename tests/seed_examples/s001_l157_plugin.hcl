# seed: 001 157-165
# Seed 001, "Driver Configuration": the client config of test_seed_001_virt.py's agent.
# sub: "/opt/ubuntu/virt_temp" -> "@DATA_DIR@": the plugin's data_dir, in the test's directory
# sub: "/var/local/statics/images/" -> "@IMAGES@"
# Added (lines marked `# added`): the plugin's network block. nomad-driver-virt attaches VMs
# to libvirt's own network (virbr0, 192.168.122.0/24); nomad-vm has no libvirt and runs that
# bridge itself, so it must be told about it. In the test it is created in the agent's network
# namespace.

plugin "nomad-driver-virt" {
  config {
    emulator {
      uri = "qemu:///default"
    }
    data_dir    = "@DATA_DIR@"
    image_paths = ["@IMAGES@"]
    network {  # added
      bridge        = "virbr0"  # added
      subnet_cidr   = "192.168.122.0/24"  # added
      create_bridge = true  # added
    }  # added
  }
}
