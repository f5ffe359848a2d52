# seed: 002 336-348
# Seed 002, "Network Configuration" > "Example (macvtap)": a group fragment, in a job skeleton,
# unchanged. (A macvtap on a veth in a test namespace is run by tests/e2e/test_macvtap_agent.py.)

job "seed-002-l336" {  # skeleton
  group "virt-group" {
    task "virt-task" {
      driver = "virt"
      config {
        network_interface {
          macvtap {
            device = "eth0"
            mode = "bridge"
          }
        }
      }
    }
  }
}  # skeleton
