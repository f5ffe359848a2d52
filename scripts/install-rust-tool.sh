#!/usr/bin/env bash
# Build a pinned Rust tool from crates.io into .tools/bin (Debian 12 packages neither):
#   virtiofsd            the virtio-fs daemon the driver runs per share
#   vhost-device-vsock   tests only: a hybrid-vsock backend for QEMU (the protocol Cloud
#                        Hypervisor speaks), so the guest agent over vsock is shown with a guest
# A no-op when the pinned version is already there. Needs cargo and libseccomp/libcap-ng headers
# (scripts/setup-host.sh installs those).
set -euo pipefail
declare -A VERSIONS=([virtiofsd]=1.14.0 [vhost-device-vsock]=0.3.0)
TOOL=${1:?usage: install-rust-tool.sh virtiofsd|vhost-device-vsock}
VERSION=${VERSIONS[$TOOL]:?unknown tool $TOOL}
ROOT="$(cd "$(dirname "$0")/.." && pwd)/.tools"
if [[ -x $ROOT/bin/$TOOL ]] && [[ $("$ROOT/bin/$TOOL" --version) == "$TOOL $VERSION" ]]; then
    exit 0
fi
CARGO=$(command -v cargo || echo "$HOME/.cargo/bin/cargo")
if [[ ! -x $CARGO ]]; then
    echo "cargo not found: install Rust (rustup) to build $TOOL" \
        "(for virtiofsd, or set share_transport = \"9p\")" >&2
    exit 1
fi
echo "building $TOOL $VERSION from crates.io (a minute or two)"
"$CARGO" install --quiet --locked --version "$VERSION" --root "$ROOT" "$TOOL"
"$ROOT/bin/$TOOL" --version
