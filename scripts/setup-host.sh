#!/usr/bin/env bash
# Install the Debian packages nomad-vm needs on this host; a no-op when all are present.
set -euo pipefail
PACKAGES=(
    qemu-system-x86   # the VMM
    qemu-utils        # qemu-img: overlays and resize
    ovmf              # UEFI firmware for uefi/uefi-secure boot
    iproute2 nftables # networking
    cpio xz-utils     # building the tiny test guest's initramfs and kernel
    python3-venv
)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}"
    SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
