# seed: 002 273-294
# Seed 002, "Disk" > "Example": a chained disk on a source image, which the pool keeps as a
# volume of its own for the next task with that image.
# sub: "http://cloud-images.ubuntu.com/focal/current" -> "@ARTIFACTS@": the loopback HTTP server serving the Debian test guest's disk under the seed's file name

job "python-server" {
  group "virt-group" {
    task "virt-task" {
      artifact {
        source = "@ARTIFACTS@/focal-server-cloudimg-amd64.img"
        destination = "local/focal-server-cloudimg-amd64.img"
        mode = "file"
      }
      driver = "virt"
      config {
        disk {
          size = "10GiB"
          pool = "local"
          chained = true
          source {
            image = "local/focal-server-cloudimg-amd64.img"
          }
        }
      }
    }
  }
}
