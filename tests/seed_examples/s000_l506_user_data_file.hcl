# seed: 000 506-508
# Seed 000, "Cloud-Init" > "File-Based User Data": a config fragment in a job skeleton.
# sub: "/etc/cloud-init" -> "@IMAGES3@": user_data must come from an allowed image path

job "seed-000-l506" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
      driver = "nomad-driver-ch"  # skeleton
config {
  user_data = "@IMAGES3@/web-server.yml"
}
    }  # skeleton
  }  # skeleton
}  # skeleton
