# seed: 000 275-298
# Seed 000, "Task Examples" > "Basic VM Task".
# sub: "/var/lib/images" -> "@IMAGES@": the Debian test guest's disk under the seed's file name
# sub: "/boot/vmlinuz-5.15.0" -> "@IMAGES2@/vmlinuz-5.15.0": the Debian guest's own kernel (PVH vmlinux) under the seed's name, in an allowed image path
# sub: "/boot/initramfs-5.15.0.img" -> "@IMAGES2@/initramfs-5.15.0.img": its initrd
# sub: "root=/dev/vda1" -> "root=/dev/vda": the test guest's root file system is the whole disk (no partition table)

job "basic-vm" {
  datacenters = ["dc1"]

  group "app" {
    task "vm" {
      driver = "nomad-driver-ch"

      config {
        image = "@IMAGES@/ubuntu-22.04.img"
        hostname = "app-server"

        # Custom kernel and initramfs
        kernel = "@IMAGES2@/vmlinuz-5.15.0"
        initramfs = "@IMAGES2@/initramfs-5.15.0.img"
        cmdline = "console=ttyS0 root=/dev/vda"
      }

      resources {
        cpu    = 2000  # 2 CPU cores
        memory = 2048  # 2GB RAM
      }
    }
  }
}
