# A web server in a Debian cloud VM (`nomad-vm image build debian`) on the plugin's bridge,
# registered as a Nomad service whose address is the VM's own (docs/networking.md).
#
# The client's plugin needs a bridge network, for example:
#
#   plugin "nomad-driver-vm" {
#     config {
#       image_paths = ["/srv/vm-images"]
#       network {
#         bridge        = "nomadvm0"
#         subnet_cidr   = "10.89.0.0/24"
#         create_bridge = true   # or create the bridge yourself, with the gateway address
#       }
#     }
#   }
#
# The driver gives the VM the pool's next free address (cloud-init network-config) and forwards
# the host port Nomad allocates for "http" to port 8080 in the guest. StartTask reports the
# VM's address to Nomad, so the service (address_mode = "driver", or the default "auto") is
# registered as <VM address>:8080. Nomad's own check cannot use address_mode = "driver" (Nomad
# rejects it for provider "nomad" and only allows it in task-level services): it goes to the
# node's address and the host port, i.e. through the driver's port forward.
#
#   nomad job run -var image=... -var kernel=... -var initramfs=... examples/web.nomad.hcl
#   nomad service info web                   # <VM address>:8080
#   nomad alloc status <alloc>               # the host port of "http"; the driver's event
#                                            # "Network: <VM address> on <TAP>"
#   curl http://<node address>:<host port>/  # through the driver's port forward
variable "image" {
  type = string
}

variable "kernel" {
  type = string
}

variable "initramfs" {
  type = string
}

variable "cmdline" {
  type    = string
  default = "root=LABEL=root ro console=ttyS0 no_timer_check"
}

job "web-vm" {
  group "web" {
    network {
      # Nomad picks the host port; the guest listens on 8080.
      port "http" {
        to = 8080
      }
    }

    task "vm" {
      driver = "vm"

      config {
        image     = var.image
        kernel    = var.kernel
        initramfs = var.initramfs
        cmdline   = var.cmdline
        hostname  = "web-1"

        network_interface {
          bridge {
            ports = ["http"]
          }
        }

        # A unit of its own, so the server outlives cloud-init's final stage.
        cmds = [
          "mkdir -p /srv/www && echo 'hello from a nomad-vm guest' > /srv/www/index.html",
          "systemd-run --unit=web python3 -m http.server 8080 --directory /srv/www",
        ]
      }

      service {
        name         = "web"
        provider     = "nomad"
        port         = "http"
        address_mode = "driver"

        check {
          type     = "http"
          path     = "/"
          interval = "5s"
          timeout  = "2s"
        }
      }

      resources {
        cpu    = 1000
        memory = 1024
      }

      # The guest shuts down through ACPI; give systemd time.
      kill_timeout = "30s"
    }
  }
}
