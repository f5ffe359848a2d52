# seed: 001 218-241
# Seed 001, "Network Configuration": a group fragment, in a job skeleton, unchanged.

job "seed-001-l218" {  # skeleton
group "virt-group" {

  network {
    mode = "host"
    port "ssh" {
      to = 22
    }
    port "http" {
      to = 80
    }
  }

  task "virt-task" {
    driver = "nomad-driver-virt"
    config {
      network_interface {
        bridge {
          name  = "virbr0"
          ports = ["ssh", "http"]
        }
      }
    }
  }
}
}  # skeleton
