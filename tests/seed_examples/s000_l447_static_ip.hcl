# seed: 000 447-457
# Seed 000, "Networking" > "Static IP Assignment": a config fragment in a job skeleton, unchanged.

job "seed-000-l447" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
      driver = "nomad-driver-ch"  # skeleton
config {
  network_interface {
    bridge {
      name = "br0"
      static_ip = "192.168.1.100"
      gateway = "192.168.1.1"
      netmask = "24"
      dns = ["8.8.8.8", "1.1.1.1"]
    }
  }
}
    }  # skeleton
  }  # skeleton
}  # skeleton
