# seed: 000 558-561
# Seed 000, "Cloud-Init" > "User Authentication": a config fragment in a job skeleton, unchanged.

job "seed-000-l558" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
      driver = "nomad-driver-ch"  # skeleton
config {
  default_user_password = "secure-password"
  default_user_authorized_ssh_key = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB..."
}
    }  # skeleton
  }  # skeleton
}  # skeleton
