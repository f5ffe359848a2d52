# The demo job: one task whose workload is a small VM (a Debian kernel and a busybox initramfs
# built by `nomad-vm image build tiny`). `make demo` runs it on a local dev agent.
variable "kernel" {
  type        = string
  description = "Path of the guest kernel (vmlinux)"
}

variable "initramfs" {
  type        = string
  description = "Path of the guest initramfs"
}

job "vm-demo" {
  type = "service"

  group "vm" {
    task "tiny" {
      driver = "vm"

      config {
        kernel    = var.kernel
        initramfs = var.initramfs
        # The guest console is the first serial port; Nomad shows it in `nomad alloc logs`.
        cmdline = "console=ttyS0 quiet no_timer_check"
      }

      resources {
        cpu    = 500
        memory = 256
      }

      # A VM needs a moment to stop; give it more than the default 5 s.
      kill_timeout = "10s"
    }
  }
}
