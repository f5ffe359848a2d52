#!/bin/sh
# Turns a debootstrapped bookworm tree into the nomad-vm Debian cloud guest. Run inside the tree
# (chroot) by nomad_vm.guests.debian_rootfs, after it has written /etc/apt/sources.list.
#
#   debian-customize.sh KERNEL_METAPACKAGE_VERSION
#
# The kernel is installed here rather than by debootstrap so that the initramfs-tools settings
# below are in place when its postinst builds the initramfs (once, and small). Every change is
# chosen to shorten boot under TCG (docs/test-guests.md) without affecting cloud-init NoCloud,
# qemu-guest-agent or ssh.
set -eu

kernel_version=${1:?usage: debian-customize.sh KERNEL_METAPACKAGE_VERSION}
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin

# Package maintainer scripts must not start daemons in the build tree.
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT

# --- small initramfs: only what mounts an ext4 root on virtio-blk (7 MB instead of 36 MB; the
# root disk must therefore be virtio-blk). gzip explicitly: the zstd default is not installed
# and mkinitramfs would warn and fall back. FSTYPE: in the build tree the fsck hook cannot probe
# the root device and would leave e2fsck out of the initramfs.
cat >/etc/initramfs-tools/conf.d/nomad-vm.conf <<'EOF'
MODULES=list
COMPRESS=gzip
RESUME=none
FSTYPE=ext4
EOF
printf '%s\n' virtio_pci virtio_blk ext4 >>/etc/initramfs-tools/modules

# The root file system is found by label, so the same disk works as vda, sda or anything else.
cat >/etc/fstab <<'EOF'
LABEL=root  /  ext4  rw,errors=remount-ro  0  1
EOF

echo debian >/etc/hostname
cat >/etc/hosts <<'EOF'
127.0.0.1 localhost
127.0.1.1 debian
::1 localhost ip6-localhost ip6-loopback
EOF
# cloud-init writes the NIC's stanza into interfaces.d; only loopback is ours.
cat >/etc/network/interfaces <<'EOF'
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
EOF

# --- packages: the pinned kernel plus any security/point-release updates of what debootstrap
# installed from the release alone.
# Use-Pty=0: there is no /dev/pts in the build tree (apt would print "E: Can not write log").
apt_get() { apt-get -q -y -o Dpkg::Use-Pty=0 --no-install-recommends "$@"; }
apt_get update
apt_get install "linux-image-amd64=${kernel_version}"
# Held so that the kernel stays the one the build keys on, even if the mirror is newer than
# the host's package lists; released afterwards so the guest can upgrade it itself.
apt-mark hold linux-image-amd64 >/dev/null
apt_get dist-upgrade
apt-mark unhold linux-image-amd64 >/dev/null
apt_get clean
rm -rf /var/lib/apt/lists/*

# --- units that cost boot time and are of no use to a short-lived VM (each is a process or a
# mount competing for the one emulated CPU with the services that matter):
#  * the timers are Persistent=, so on a fresh image each fires during the first boot;
#  * e2scrub_reap looks for LVM snapshots that cannot exist here;
#  * modprobe@{drm,efi_pstore,dm_mod} preload modules that load on demand when needed anyway;
#  * debugfs/tracefs mounts and binfmt_misc serve debugging and foreign binaries.
systemctl mask --quiet apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer \
    modprobe@drm.service modprobe@efi_pstore.service modprobe@dm_mod.service \
    sys-kernel-debug.mount sys-kernel-tracing.mount systemd-binfmt.service
# The console is the serial port (console=ttyS0; systemd adds its getty by itself). A getty on
# the VGA text console, which these VMs do not show, would be one more process at boot.
systemctl disable --quiet getty@tty1.service
# Generators run at every boot and daemon-reload; these look for features this image does not
# have (LUKS, dm-integrity, dm-verity, hibernation, GPT partition discovery, offline updates).
mkdir -p /etc/systemd/system-generators
for generator in cryptsetup integritysetup veritysetup hibernate-resume gpt-auto system-update; do
    ln -sf /dev/null "/etc/systemd/system-generators/systemd-${generator}-generator"
done

# Drivers udev would load for the pc machine's legacy devices (floppy, PC speaker, SMBus, PS/2
# mouse), for nested KVM (useless under TCG; these guests run no VMs) and for CPU frequency
# scaling. Blacklisting only stops loading by device alias: `modprobe NAME` still works.
# ata_piix stays: a NoCloud seed may come as an IDE CD-ROM. button stays: ACPI power-off.
cat >/etc/modprobe.d/nomad-vm-blacklist.conf <<'EOF'
blacklist floppy
blacklist pcspkr
blacklist i2c_piix4
blacklist kvm
blacklist kvm_amd
blacklist kvm_intel
blacklist powernow_k8
blacklist acpi_cpufreq
blacklist joydev
blacklist serio_raw
blacklist psmouse
EOF

# qemu-guest-agent has no [Install] section: udev starts it (SYSTEMD_WANTS) when the virtio
# port org.qemu.guest_agent.0 appears. Fail the build if that path is missing.
grep -qs 'org.qemu.guest_agent.0' /lib/udev/rules.d/*qemu-guest-agent*.rules
grep -q 'BindsTo=dev-virtio' /lib/systemd/system/qemu-guest-agent.service
# By default the agent would also wait for basic.target, and so for cloud-init's network stage
# (cloud-init.service orders itself before sysinit.target): 20-25 s more under TCG with a seed.
# It needs only the port and the local file systems.
mkdir -p /etc/systemd/system/qemu-guest-agent.service.d
cat >/etc/systemd/system/qemu-guest-agent.service.d/nomad-vm-early.conf <<'EOF'
[Unit]
DefaultDependencies=no
After=local-fs.target systemd-journald.socket
Before=shutdown.target
Conflicts=shutdown.target
EOF

# --- ssh: host keys made at build time would be shared by every VM of this image, so there are
# none. cloud-init makes fresh ones before ssh starts (cloud-init.service is ordered before
# sshd.service); the drop-in covers boots without a seed, where ds-identify disables cloud-init.
# Only Ed25519 and ECDSA: an RSA key takes many seconds to generate under TCG, and every
# current client accepts the other two (user-data can still ask cloud-init for RSA).
rm -f /etc/ssh/ssh_host_*
mkdir -p /usr/lib/nomad-vm /etc/systemd/system/ssh.service.d
cat >/usr/lib/nomad-vm/ssh-host-keys <<'EOF'
#!/bin/sh
# Generate the ssh host keys this VM lacks (see ssh.service.d/nomad-vm-host-keys.conf).
set -eu
for type in ed25519 ecdsa; do
    key=/etc/ssh/ssh_host_${type}_key
    [ -e "$key" ] || ssh-keygen -q -t "$type" -N '' -f "$key"
done
EOF
chmod 755 /usr/lib/nomad-vm/ssh-host-keys
cat >/etc/systemd/system/ssh.service.d/nomad-vm-host-keys.conf <<'EOF'
[Service]
# Reset the list: sshd -t must run after the keys exist, not before.
ExecStartPre=
ExecStartPre=/usr/lib/nomad-vm/ssh-host-keys
ExecStartPre=/usr/sbin/sshd -t
EOF

# --- cloud-init: drop modules for other distributions, clouds and tools not in this image.
# Importing and skipping each costs time; the rest keep their defaults (write_files, users,
# ssh, runcmd, phone_home, final_message, power_state, ...). growpart is out because the disk
# has no partition table: resizefs alone grows the root file system to a larger overlay.
# Host key types as for ssh above.
# manage_etc_hosts: the instance's hostname must resolve (sudo complains otherwise); the
# static /etc/hosts above only knows the image's own name.
cat >/etc/cloud/cloud.cfg.d/90-nomad-vm.cfg <<'EOF'
ssh_genkeytypes: [ed25519, ecdsa]
manage_etc_hosts: true
cloud_init_modules:
 - migrator
 - seed_random
 - bootcmd
 - write-files
 - resizefs
 - disk_setup
 - mounts
 - set_hostname
 - update_hostname
 - update_etc_hosts
 - ca-certs
 - users-groups
 - ssh
cloud_config_modules:
 - set-passwords
 - apt-configure
 - ntp
 - timezone
 - runcmd
cloud_final_modules:
 - package-update-upgrade-install
 - write-files-deferred
 - scripts-vendor
 - scripts-per-once
 - scripts-per-boot
 - scripts-per-instance
 - scripts-user
 - keys-to-console
 - phone-home
 - final-message
 - power-state-change
EOF

# Every VM must get its own machine id. An empty file (not a missing one) makes systemd create
# one at boot without treating it as a "first boot" that re-applies unit presets.
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id

# Leave no build residue. (Root has no password: logins are by ssh key, given to cloud-init's
# default user "debian", or through the guest agent.)
rm -f /var/log/*.log /var/cache/debconf/*-old /var/lib/dpkg/*-old

# debootstrap copied the build host's resolver into the tree for apt; a guest must not inherit
# it (it would send its lookups to a server of the build machine's network). Empty: a guest's
# name servers come from DHCP or from the cloud-init seed (`dns`).
: >/etc/resolv.conf
