# seed: 001 32-75
# Seed 001 (nomad-driver-virt README, earlier version), "Ubuntu Example job": runs on nomad-vm
# installed `--as virt-legacy` (its jobs say driver = "nomad-driver-virt").
# sub: "http://cloud-images.ubuntu.com/focal/current" -> "@ARTIFACTS@": a loopback HTTP server in the agent's network namespace, serving the Debian test guest's disk under the seed's file name
# The bridge virbr0 is the plugin's (installed as nomad-driver-virt it runs libvirt's default
# network itself), inside the test's network namespace.

job "python-server" {

  group "virt-group" {
    count = 1

    network {
      mode = "host"
      port "http" {
        to = 8000
      }
    }

    task "virt-task" {

      driver = "nomad-driver-virt"

      artifact {
        source      = "@ARTIFACTS@/focal-server-cloudimg-amd64.img"
        destination = "local/focal-server-cloudimg-amd64.img"
        mode        = "file"
      }

      config {
        image                 = "local/focal-server-cloudimg-amd64.img"
        primary_disk_size     = 10000
        use_thin_copy         = true
        default_user_password = "password"
        cmds                  = ["python3 -m http.server 8000"]

        network_interface {
          bridge {
            name  = "virbr0"
            ports = ["http"]
          }
        }
      }

      resources {
        cores  = 2
        memory = 4000
      }
    }
  }
}
