# seed: 000 304-336
# Seed 000, "Task Examples" > "VM with Custom User Data".
# sub: "/var/lib/images" -> "@IMAGES@": the Debian test guest's disk under the seed's file name
# sub: "/etc/cloud-init" -> "@IMAGES3@": user_data must come from an allowed image path; the test writes nginx-setup.yml there
# The guest is Debian, so the seed's `apk` commands fail inside it (cloud-init logs that; the task runs on).

job "custom-vm" {
  datacenters = ["dc1"]

  group "web" {
    task "nginx" {
      driver = "nomad-driver-ch"

      config {
        image = "@IMAGES@/alpine.img"
        hostname = "nginx-server"

        # Cloud-init user data
        user_data = "@IMAGES3@/nginx-setup.yml"

        # Default user configuration
        default_user_password = "secure123"
        default_user_authorized_ssh_key = "ssh-rsa AAAAB3NzaC1yc2E..."

        # Custom commands to run
        cmds = [
          "apk add --no-cache nginx",
          "rc-service nginx start",
          "rc-update add nginx default"
        ]
      }

      resources {
        cpu    = 1000
        memory = 512
      }
    }
  }
}
