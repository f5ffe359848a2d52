# seed: 002 310-331
# Seed 002, "Network Configuration" > "Example (bridge)": a group fragment, in a job skeleton,
# unchanged.

job "seed-002-l310" {  # skeleton
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
      driver = "virt"
      config {
        network_interface {
          bridge {
            name = "virbr0"
            ports = ["ssh", "http"]
          }
        }
      }
    }
  }
}  # skeleton
