# seed: 000 611-637
# Seed 000, "Storage" > "Shared Filesystems".
# sub: "/var/lib/images" -> "@IMAGES@": the Debian test guest's disk under the seed's file name
# sub: "memory = 4096" -> "memory = 1024": this machine's guests share 2 cores and its memory with other tests
# The client's host volume "app-data" is a test directory (the agent's `host_volume` block).

job "shared-storage" {
  group "app" {
    volume "shared-data" {
      type   = "host"
      source = "app-data"
    }

    task "processor" {
      driver = "nomad-driver-ch"

      config {
        image = "@IMAGES@/data-processor.img"
      }

      volume_mount {
        volume      = "shared-data"
        destination = "/app/data"
        read_only   = false
      }

      resources {
        cpu    = 2000
        memory = 1024
      }
    }
  }
}
