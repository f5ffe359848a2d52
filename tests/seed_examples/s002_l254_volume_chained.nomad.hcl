# seed: 002 254-270
# Seed 002, "Disk" > "Example": a chained (copy-on-write) disk on the pool volume
# focal-server-cloudimg-amd64.img. Unchanged: the test puts the Debian test guest's disk into
# the directory pool under that volume name, and checks it is not written.

job "python-server" {
  group "virt-group" {
    task "virt-task" {
      driver = "virt"
      config {
        disk {
          size = "10GiB"
          pool = "local"
          chained = true
          source {
            volume = "focal-server-cloudimg-amd64.img"
          }
        }
      }
    }
  }
}
