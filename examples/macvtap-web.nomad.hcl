# A web server in a VM on a host interface's own network through a macvtap link, in the virt
# driver's syntax (docs/networking.md, "macvtap"). No bridge or address pool of the plugin's,
# no port forwarding: the guest takes its address from that network's DHCP server and is
# reached there at its own address. The guest is the tiny test guest (`nomad-vm image build
# tiny`); with `nomadvm.dhcp=1` its /init runs busybox udhcpc on eth0 and prints the lease.
#
#   nomad job run -var kernel=... -var initramfs=... -var device=eth0 examples/macvtap-web.nomad.hcl
#   nomad alloc logs <alloc>       # "nomad-vm tiny guest: dhcp eth0 192.168.1.57/24 router ..."
variable "kernel" {
  type = string
}

variable "initramfs" {
  type = string
}

variable "device" {
  type    = string
  default = "eth0"
}

locals {
  serve = "mkdir /www && echo 'hello over macvtap' >/www/index.html && httpd -f -p 8080 -h /www"
}

job "macvtap-web" {
  group "web" {
    task "vm" {
      driver = "vm"

      config {
        kernel    = var.kernel
        initramfs = var.initramfs
        cmdline   = "console=ttyS0 quiet no_timer_check panic=-1 nomadvm.dhcp=1 nomadvm.run=${base64encode(local.serve)}"

        network_interface {
          macvtap {
            device = var.device
            mode   = "bridge"
          }
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
