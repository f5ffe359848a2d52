# A Debian cloud VM (`nomad-vm image build debian`): a thin copy of the image, the guest's own
# kernel with its root filesystem on the disk, cloud-init from the task options, and Nomad's
# local/ directory at /local in the guest. `nomad alloc exec -task vm <alloc> bash` opens a shell
# in it (a pty relayed through qemu-guest-agent); with -t=false commands run without a terminal.
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

job "debian-vm" {
  group "vm" {
    task "vm" {
      driver = "vm"

      config {
        image     = var.image
        kernel    = var.kernel
        initramfs = var.initramfs
        cmdline   = var.cmdline
        hostname  = "debian-1"
        timezone  = "Etc/UTC"
        cmds      = ["echo hello from cloud-init > /dev/ttyS0"]
      }

      template {
        destination = "local/motd"
        data        = "Running as allocation {{ env \"NOMAD_ALLOC_ID\" }}\n"
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
