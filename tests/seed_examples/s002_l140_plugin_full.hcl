# seed: 002 140-170
# Seed 002, "Driver Configuration" > "Examples": the full libvirt configuration (provider, two
# image paths, a directory and a Ceph pool), loaded by an agent of its own in a network
# namespace with nothing but loopback (the Ceph monitors' addresses lead nowhere from there).
# sub: "/var/lib/virt/images" -> "@IMAGES@"
# sub: "/opt/custom-images" -> "@IMAGES2@"
# sub: "/var/lib/virt/storage" -> "@STORAGE@"
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
ceph "remote-storage" {
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
