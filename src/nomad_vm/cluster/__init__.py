"""A real Nomad cluster on one machine: one server and several clients, each in a network
namespace of its own (``bed``: build, reach, break and tear down; ``agents``: their configs).
Used by tests/e2e/test_cluster.py and by `make cluster` (``nomad_vm.cli.cluster``)."""
