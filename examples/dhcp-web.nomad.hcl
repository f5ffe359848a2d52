# A web server in a VM *without cloud-init* that learns its address by DHCP from the plugin
# (docs/networking.md, "DHCP mode"). The guest is the tiny test guest (`nomad-vm image build
# tiny`): a kernel and a busybox initramfs, no disk, so no cloud-init seed; with
# `nomadvm.dhcp=1` its /init runs busybox udhcpc on eth0.
#
# The client's plugin needs a bridge network with DHCP on, for example:
#
#   plugin "nomad-driver-vm" {
#     config {
#       image_paths = ["/srv/vm-images"]
#       network {
#         subnet_cidr   = "10.89.0.0/24"
#         create_bridge = true
#         dhcp          = true   # dnsmasq (Debian: dnsmasq-base) answers the VMs' MACs only
#       }
#     }
#   }
#
# The driver picks the address before the VM boots, tells Nomad (the service below is
# registered as <VM address>:8080) and gives dnsmasq the MAC -> address pair.
#
#   nomad job run -var kernel=... -var initramfs=... examples/dhcp-web.nomad.hcl
#   nomad alloc logs <alloc>       # "nomad-vm tiny guest: dhcp eth0 10.89.0.2/24 router ..."
variable "kernel" {
  type = string
}

variable "initramfs" {
  type = string
}

locals {
  # What the guest runs once it has an address (the tiny guest's nomadvm.run, base64).
  serve = "mkdir /www && echo 'hello over dhcp' >/www/index.html && httpd -f -p 8080 -h /www"
}

job "dhcp-web" {
  group "web" {
    network {
      port "http" {
        to = 8080
      }
    }

    task "vm" {
      driver = "vm"

      config {
        kernel    = var.kernel
        initramfs = var.initramfs
        cmdline   = "console=ttyS0 quiet no_timer_check panic=-1 nomadvm.dhcp=1 nomadvm.run=${base64encode(local.serve)}"
        hostname  = "dhcp-web"

        network_interface {
          bridge {
            ports = ["http"]
          }
        }
      }

      service {
        name         = "dhcp-web"
        provider     = "nomad"
        port         = "http"
        address_mode = "driver"

        check {
          type     = "http"
          path     = "/"
          interval = "3s"
          timeout  = "2s"
        }
      }

      resources {
        cpu    = 500
        memory = 256
      }

      kill_timeout = "10s"
    }
  }
}
