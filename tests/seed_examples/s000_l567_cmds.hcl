# seed: 000 567-574
# Seed 000, "Cloud-Init" > "Custom Commands": a config fragment in a job skeleton, unchanged.

job "seed-000-l567" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
      driver = "nomad-driver-ch"  # skeleton
config {
  # Commands run during boot process
  cmds = [
    "apt-get update",
    "apt-get install -y docker.io",
    "systemctl enable docker"
  ]
}
    }  # skeleton
  }  # skeleton
}  # skeleton
