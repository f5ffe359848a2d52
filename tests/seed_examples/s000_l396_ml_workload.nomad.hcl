# seed: 000 396-420
# Seed 000, "Task Examples" > "GPU-Accelerated VM". Needs an NVIDIA GPU, which this machine
# lacks: Nomad cannot place it (no node has an "nvidia/gpu" device), asserted on `nomad job plan`.
# sub: "/var/lib/images" -> "@IMAGES@"

job "ml-workload" {
  datacenters = ["dc1"]

  group "gpu" {
    task "training" {
      driver = "nomad-driver-ch"

      config {
        image = "@IMAGES@/cuda-ubuntu.img"
        hostname = "ml-trainer"

        # VFIO GPU passthrough (not yet implemented)
        # vfio_devices = ["10de:2204"]  # NVIDIA RTX 3080
      }

      resources {
        cpu      = 8000  # 8 CPU cores
        memory   = 16384 # 16GB RAM
        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }
}
