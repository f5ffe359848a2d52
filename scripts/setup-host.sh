#!/usr/bin/env bash
# Install the Debian packages nomad-vm needs on this host; a no-op when all are present.
set -euo pipefail
PACKAGES=(
    qemu-system-x86   # the VMM
    qemu-utils        # qemu-img: overlays and resize
    ovmf              # UEFI firmware for uefi/uefi-secure boot
    iproute2 nftables # networking
    dnsmasq-base      # the DHCP mode's server (network { dhcp = true }); its tests
    containernetworking-plugins  # Nomad's bridge networking mode (CNI), in the e2e tests
    libseccomp-dev libcap-ng-dev pkg-config  # building virtiofsd (virtio-fs) from crates.io
    cpio xz-utils     # building the tiny test guest's initramfs and kernel
    sbsigntool openssl  # Secure Boot tests sign a test kernel with a throwaway key
    debootstrap extlinux e2fsprogs mount  # building the Debian cloud test guest
    genisoimage       # isoinfo: tests read the cloud-init seed ISO back with a second tool
    python3-venv
    ceph-mon ceph-mgr ceph-osd ceph-common  # the single-node Ceph cluster the RBD pool tests start
    qemu-block-extra  # QEMU's rbd block driver (Ceph pools)
    python3-rados python3-rbd  # the Ceph bindings the plugin creates, clones and removes volumes with
    swtpm swtpm-tools # a TPM 2.0 per task (os { variant = "windows..." } / tpm = true)
    novnc websockify  # `nomad-vm console serve`: the noVNC page (served from the package)
    chromium fonts-dejavu-core  # the browser test of the console page (headless)
)
SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
# The tiny guest is built from Debian packages (`apt-get download`), which needs package lists
# even when every host package is already installed.
policy=$(apt-cache policy linux-image-amd64 busybox-static 2>/dev/null || true)
if [[ $policy != *"Candidate: "[0-9]* ]]; then
    $SUDO apt-get update -q
fi
missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
