# seed: 002 236-251
# Seed 002, "Disk" > "Example": a disk cloned from the pool volume
# focal-server-cloudimg-amd64.img, resized to 10GiB. Unchanged: the test puts the Debian test
# guest's disk into the directory pool under that volume name.

job "python-server" {
  group "virt-group" {
    task "virt-task" {
      driver = "virt"
      config {
        disk {
          size = "10GiB"
          pool = "local"
          source {
            volume = "focal-server-cloudimg-amd64.img"
          }
        }
      }
    }
  }
}
