# seed: 002 127-136
# Seed 002, "Driver Configuration" > "Examples": the minimal configuration, the client config of
# test_seed_002_virt.py's agent.
# sub: "/var/lib/virt/images" -> "@IMAGES@"
# sub: "/var/lib/virt/storage" -> "@STORAGE@": the directory pool, in the test's directory
# Added (the line marked `# added`): a data_dir in the test's directory (the default is under
# /var/lib). No network block, as in the seed: installed as nomad-driver-virt, the plugin runs
# libvirt's default network (virbr0, 192.168.122.0/24) itself; in the test, inside the agent's
# network namespace.

plugin "nomad-driver-virt" {
  config {
    image_paths = ["@IMAGES@"]
    storage_pools {
      directory "local" {
        path = "@STORAGE@"
      }
    }
    data_dir = "@DATA_DIR@"  # added
  }
}
