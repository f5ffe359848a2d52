# seed: 000 434-441
# Seed 000, "Networking" > "Automatic IP Allocation": a task's config fragment, placed in a job
# skeleton (the lines marked `# skeleton`), unchanged.

job "seed-000-l434" {  # skeleton
  group "g" {  # skeleton
    task "t" {  # skeleton
      driver = "nomad-driver-ch"  # skeleton
config {
  network_interface {
    bridge {
      name = "br0"
      # IP will be allocated from pool automatically
    }
  }
}
    }  # skeleton
  }  # skeleton
}  # skeleton
