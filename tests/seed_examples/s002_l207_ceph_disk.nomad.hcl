# seed: 002 207-232
# Seed 002, "Disk" > "Example": a primary disk in the directory pool "local" (10GiB, from the
# artifact) and a secondary empty disk of 20GB in the Ceph pool "ceph-storage". Run against a
# real single-node Ceph cluster by tests/integration/test_seed_virt_ceph_example.py (the
# plugin alone) and tests/seed_examples/test_seed_002_ceph.py (a real agent, the cluster's
# monitor inside the agent's network namespace). Pool names and sizes are the seed's.
# sub: "http://cloud-images.ubuntu.com/focal/current" -> "@ARTIFACTS@": a loopback HTTP server in the agent's network namespace, serving the Debian test guest's disk under the seed's file name

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
          primary = true
          source {
            image = "local/focal-server-cloudimg-amd64.img"
          }
        }
        disk {
          size = "20GB"
          pool = "ceph-storage"
        }
      }
    }
  }
}
