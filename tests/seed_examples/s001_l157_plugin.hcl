# seed: 001 157-165
# Seed 001, "Driver Configuration": the client config of test_seed_001_virt.py's agent.
# sub: "/opt/ubuntu/virt_temp" -> "@DATA_DIR@": the plugin's data_dir, in the test's directory
# sub: "/var/local/statics/images/" -> "@IMAGES@"
# No network block, as in the seed: installed as nomad-driver-virt, the plugin runs libvirt's
# default network (virbr0, 192.168.122.0/24) itself; in the test, inside the agent's network
# namespace.

plugin "nomad-driver-virt" {
  config {
    emulator {
      uri = "qemu:///default"
    }
    data_dir    = "@DATA_DIR@"
    image_paths = ["@IMAGES@"]
  }
}
