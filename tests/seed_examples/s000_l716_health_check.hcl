# seed: 000 716-741
# Seed 000, "Monitoring" > "VM Health Checks": a task fragment (it says driver = "virt", copied
# from nomad-driver-virt's README), in a job skeleton whose group declares the port "http" the
# service names. Nomad refuses it: a task-level service's check cannot use address_mode =
# "alloc" (only a group service's can); asserted.
# sub: "/var/lib/images" -> "@IMAGES@"

job "seed-000-l716" {  # skeleton
  group "g" {  # skeleton
    network {  # skeleton
      port "http" {}  # skeleton
    }  # skeleton
task "web-server" {
  driver = "virt"

  config {
    image = "@IMAGES@/nginx.img"
    network_interface {
      bridge {
        name = "br0"
        static_ip = "192.168.1.100"
      }
    }
  }

  service {
    name = "web"
    port = "http"

    check {
      type     = "http"
      path     = "/"
      interval = "30s"
      timeout  = "5s"
      address_mode = "alloc"
    }
  }
}
  }  # skeleton
}  # skeleton
