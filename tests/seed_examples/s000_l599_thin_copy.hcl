# seed: 000 599-603
# Seed 000, "Storage" > "Thin Provisioning": a config fragment in a job skeleton.
# sub: "/var/lib/images" -> "@IMAGES@"

job "seed-000-l599" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
      driver = "nomad-driver-ch"  # skeleton
config {
  image = "@IMAGES@/base-ubuntu.img"
  use_thin_copy = true
  primary_disk_size = 10240  # 10GB allocated space
}
    }  # skeleton
  }  # skeleton
}  # skeleton
