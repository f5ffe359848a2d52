# seed: 000 539-550
# Seed 000, "Cloud-Init" > "Inline User Data": a config fragment in a job skeleton, unchanged.

job "seed-000-l539" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
      driver = "nomad-driver-ch"  # skeleton
config {
  user_data = <<EOF
#cloud-config
package_update: true
packages:
  - docker.io
runcmd:
  - systemctl enable docker
  - systemctl start docker
  - docker run -d -p 80:80 nginx:alpine
EOF
}
    }  # skeleton
  }  # skeleton
}  # skeleton
