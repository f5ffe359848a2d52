# seed: 000 478-494
# Seed 000, "Networking" > "Port Mapping": a task's config and its group's network, in a job
# skeleton, unchanged.

job "seed-000-l478" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
      driver = "nomad-driver-ch"  # skeleton
config {
  network_interface {
    bridge {
      name = "br0"
      ports = ["web", "api"]  # Reference port labels from network block
    }
  }
}
    }  # skeleton

network {
  port "web" {
    static = 80
  }
  port "api" {
    static = 8080
  }
}
  }  # skeleton
}  # skeleton
