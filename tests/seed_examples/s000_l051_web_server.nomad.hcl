# seed: 000 51-76
# Seed 000 (nomad-driver-ch README), "Quick Start" > "Basic Example".
# sub: "/var/lib/images" -> "@IMAGES@": a test directory; the Debian test guest's disk is put there under the seed's file name
# The bridge br0 and its 192.168.1.1/24 are made by the test inside a network namespace of its own
# (as the seed's "Configure Bridge Networking" step does on a host), where the agent runs.

job "web-server" {
  datacenters = ["dc1"]
  type = "service"

  group "web" {
    task "nginx" {
      driver = "nomad-driver-ch"

      config {
        image = "@IMAGES@/alpine-nginx.img"

        network_interface {
          bridge {
            name = "br0"
            static_ip = "192.168.1.100"
          }
        }
      }

      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }
}
