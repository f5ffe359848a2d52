# seed: 001 185-200
# Seed 001, "Task Configuration": a task's fragment, in a job skeleton.
# sub: "http://cloud-images.ubuntu.com/focal/current" -> "@ARTIFACTS@": the loopback HTTP server serving the Debian test guest's disk under the seed's file name

job "seed-001-l185" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
driver = "nomad-driver-virt"

artifact {
  source      = "@ARTIFACTS@/focal-server-cloudimg-amd64.img"
  destination = "local/focal-server-cloudimg-amd64.img"
  mode        = "file"
}

config {
  image                           = "local/focal-server-cloudimg-amd64.img"
  primary_disk_size               = 9000
  use_thin_copy                   = true
  default_user_password           = "password"
  cmds                            = ["touch /home/ubuntu/file.txt"]
  default_user_authorized_ssh_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC31v1..."
}
    }  # skeleton
  }  # skeleton
}  # skeleton
