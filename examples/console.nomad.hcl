# `nomad-vm console serve` on every client (a system job), under raw_exec as root: it reads the
# plugin's root-only console registry (<data_dir>/consoles) and connects to the VMs' VNC
# sockets in their root-only runtime directories. Seed 004 ("Nomad QEMU node") enables
# raw_exec for such tools; elsewhere the client needs
#
#   plugin "raw_exec" {
#     config { enabled = true }
#   }
#
# Each VM that should show up has `display = "vga"` (or "virtio") in its task config. Open
# http://<node>:5800 and sign in with a Nomad ACL token that may `nomad alloc exec` into the
# allocation (capability alloc-exec in its namespace); the server holds no token of its own.
# With ACLs off the server refuses to listen beyond loopback (pass
# --allow-remote-without-acl to insist): every console would be open to anyone.
variable "nomad_vm" {
  type        = string
  description = "The nomad-vm executable (in the venv the plugin was installed from)"
  default     = "/opt/nomad-vm/bin/nomad-vm"
}

variable "listen" {
  type        = string
  description = "HOST:PORT to serve on; the node's address needs ACLs on (the seed's port is 5800)"
  default     = "127.0.0.1:5800"
}

variable "nomad_addr" {
  type        = string
  description = "This client's Nomad HTTP API (the server asks it who may open which console)"
  default     = "http://127.0.0.1:4646"
}

variable "data_dir" {
  type        = string
  description = "The plugin's data_dir (nomad-vm install --data-dir)"
  default     = "/var/lib/nomad-vm"
}

job "nomad-vm-console" {
  type = "system"

  group "console" {
    task "serve" {
      driver = "raw_exec"

      config {
        command = var.nomad_vm
        args = [
          "console", "serve",
          "--listen", var.listen,
          "--nomad-addr", var.nomad_addr,
          "--data-dir", var.data_dir,
        ]
      }

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
