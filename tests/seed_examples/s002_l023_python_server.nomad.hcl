# seed: 002 23-61
# Seed 002 (nomad-driver-virt README, later version), "Ubuntu Example job".
# sub: "http://cloud-images.ubuntu.com/focal/current" -> "@ARTIFACTS@": a loopback HTTP server in the agent's network namespace, serving the Debian test guest's disk under the seed's file name
# sub: "cores = 2" -> "cores = 1": the node has 2 cores; the pool examples run beside this job
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
      driver = "virt"
      artifact {
        source = "@ARTIFACTS@/focal-server-cloudimg-amd64.img"
        destination = "local/focal-server-cloudimg-amd64.img"
        mode = "file"
      }
      config {
        default_user_password = "password"
        cmds = ["python3 -m http.server 8000"]
        disk {
          size = "10GiB"
          source {
            image = "local/focal-server-cloudimg-amd64.img"
          }
        }
        network_interface {
          bridge {
            name = "virbr0"
            ports = ["http"]
          }
        }
      }
      resources {
        cores = 1
        memory = 4000
      }
    }
  }
}
