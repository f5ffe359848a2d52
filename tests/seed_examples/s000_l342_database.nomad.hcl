# seed: 000 342-390
# Seed 000, "Task Examples" > "VM with Storage and Networking".
# sub: "/var/lib/images" -> "@IMAGES@": the Debian test guest's disk under the seed's file name
# Nomad refuses this job as written: its `volume "postgres-data"` block is at the job's level,
# and Nomad takes `volume` only inside a group ("Blocks of type "volume" are not expected
# here"). Asserted; s000_l611_shared_storage.nomad.hcl runs a host volume the seed's way.

job "database" {
  datacenters = ["dc1"]

  group "db" {
    task "postgres" {
      driver = "nomad-driver-ch"

      config {
        image = "@IMAGES@/postgres-14.img"
        hostname = "postgres-primary"

        # Enable thin copy for faster startup
        use_thin_copy = true
        primary_disk_size = 20480  # 20GB

        # Network configuration with static IP
        network_interface {
          bridge {
            name = "br0"
            static_ip = "192.168.1.50"
            gateway = "192.168.1.1"
            netmask = "24"
            dns = ["8.8.8.8", "1.1.1.1"]
          }
        }

        # Custom timezone
        timezone = "America/New_York"
      }

      resources {
        cpu    = 4000  # 4 CPU cores
        memory = 8192  # 8GB RAM
      }

      # Mount shared storage
      volume_mount {
        volume      = "postgres-data"
        destination = "/var/lib/postgresql"
      }
    }
  }

  volume "postgres-data" {
    type      = "host"
    source    = "postgres-data"
    read_only = false
  }
}
