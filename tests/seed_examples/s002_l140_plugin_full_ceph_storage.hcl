# seed: 002 140-170
# Seed 002, "Driver Configuration" > "Examples": the full libvirt configuration again, as the
# client config of the Ceph disk example (s002_l207_ceph_disk.nomad.hcl), whose job names its
# Ceph pool "ceph-storage" where this example names it "remote-storage". The Ceph keys are
# the seed's: the test's cluster runs in the agent's network namespace, its monitor at
# 10.0.0.2:3300 (10.0.0.12 and 10.0.0.99 are addresses there with no monitor), its RBD pool
# nomad-pool, and client.nomad has the seed's key.
# sub: "/var/lib/virt/images" -> "@IMAGES@"
# sub: "/opt/custom-images" -> "@IMAGES2@"
# sub: "/var/lib/virt/storage" -> "@STORAGE@"
# sub: "remote-storage" -> "ceph-storage": the pool's name in the job (seed lines 207-232)
# Added (the line marked `# added`): a data_dir in the test's directory.

plugin "nomad-driver-virt" {
config {
provider "libvirt" {
uri = "qemu:///system"
user = "libvirt-username"
password = "libvirt-pass"
}
image_paths = [
"@IMAGES@",
"@IMAGES2@",
]
storage_pools {
default = "local"
directory "local" {
path = "@STORAGE@"
}
ceph "ceph-storage" {
pool = "nomad-pool"
hosts = [
"10.0.0.2:3300",
"10.0.0.12:3300",
"10.0.0.99:3300",
]
authentication {
username = "nomad"
secret = "AQCzNMxpb6aWIxAA7YrNMSg8z5TxEvB0jsuibQ=="
}
}
}
data_dir = "@DATA_DIR@"  # added
}
}
