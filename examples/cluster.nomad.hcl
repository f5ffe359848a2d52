# The cluster test bed's job (docs/cluster.md): `count` tiny VMs spread over the clients, each
# serving its own allocation ID over HTTP on port 8080 of its address on its client's bridge.
#
# The clients' plugins run their bridge with `dhcp = true`: the tiny guest has no cloud-init
# and learns the address the driver chose by DHCP (like examples/dhcp-web.nomad.hcl).
#
#   nomad job run -var kernel=... -var initramfs=... examples/cluster.nomad.hcl
#   nomad job status cluster-web            # one allocation per client
#   nomad node drain -enable -yes <node>    # its VM moves (cold boot) to another client
variable "kernel" {
  type = string
}

variable "initramfs" {
  type = string
}

variable "count" {
  type    = number
  default = 3
}

locals {
  # The guest's command (the tiny guest's nomadvm.run, base64): serve the nomadvm.alloc=<id>
  # argument of its own kernel command line, so a reply names the allocation it comes from.
  serve = "mkdir /www && sed -n 's/.*nomadvm.alloc=\\([^ ]*\\).*/\\1/p' /proc/cmdline >/www/index.html && httpd -f -p 8080 -h /www"
}

job "cluster-web" {
  # One VM per client while there are enough clients (soft: a drained or lost client's VM
  # still finds a place on the others).
  spread {
    attribute = "${node.unique.name}"
  }

  group "web" {
    count = var.count

    network {
      port "http" {
        to = 8080
      }
    }

    # A drain moves one allocation at a time and counts it healthy once its task runs for 1 s
    # (the default 10 s only slows the bed down).
    migrate {
      max_parallel     = 1
      health_check     = "task_states"
      min_healthy_time = "1s"
    }

    # A VM that fails (e.g. its plugin was killed in the middle of a start) comes back quickly,
    # as often as it takes: the bed checks the end state, not the number of attempts.
    reschedule {
      delay          = "5s"
      delay_function = "constant"
      unlimited      = true
    }

    restart {
      attempts = 2
      interval = "30s"
      delay    = "1s"
      mode     = "fail"
    }

    task "vm" {
      driver = "vm"

      config {
        kernel    = var.kernel
        initramfs = var.initramfs
        cmdline   = "console=ttyS0 quiet no_timer_check panic=-1 nomadvm.dhcp=1 nomadvm.alloc=${NOMAD_ALLOC_ID} nomadvm.run=${base64encode(local.serve)}"

        network_interface {
          bridge {
            ports = ["http"]
          }
        }
      }

      resources {
        cpu    = 200
        memory = 128
      }

      kill_timeout = "10s"
    }
  }
}
