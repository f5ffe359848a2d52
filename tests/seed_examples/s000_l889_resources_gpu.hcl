# seed: 000 889-902
# Seed 000, "API Reference" > "Resource Configuration": a resources fragment in a job skeleton
# (with the API reference's first line of config, an image). Needs a GPU: Nomad cannot place
# it here (no "nvidia/gpu" device), asserted on `nomad job plan`.

job "seed-000-l889" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
      driver = "nomad-driver-ch"  # skeleton
      config {  # skeleton
        image = "@IMAGES@/vm-image.img"  # skeleton
      }  # skeleton
resources {
  cpu    = 2000    # CPU shares (1 core = 1000)
  memory = 2048    # Memory in MB

  # Optional: GPU devices
  device "nvidia/gpu" {
    count = 1
    constraint {
      attribute = "${device.attr.compute_capability}"
      operator  = ">="
      value     = "6.0"
    }
  }
}
    }  # skeleton
  }  # skeleton
}  # skeleton
