#!/usr/bin/env bash
# Build virtiofsd (virtio-fs shares) from crates.io into .tools/bin; Debian 12 does not package it.
# A no-op when the pinned version is already there. Needs cargo and libseccomp/libcap-ng headers
# (scripts/setup-host.sh installs those).
set -euo pipefail
VERSION=1.14.0
ROOT="$(cd "$(dirname "$0")/.." && pwd)/.tools"
if [[ -x $ROOT/bin/virtiofsd ]] && [[ $("$ROOT/bin/virtiofsd" --version) == "virtiofsd $VERSION" ]]; then
    exit 0
fi
CARGO=$(command -v cargo || echo "$HOME/.cargo/bin/cargo")
if [[ ! -x $CARGO ]]; then
    echo "cargo not found: install Rust (rustup) to build virtiofsd, or set share_transport = \"9p\"" >&2
    exit 1
fi
echo "building virtiofsd $VERSION from crates.io (about a minute)"
"$CARGO" install --quiet --locked --version "$VERSION" --root "$ROOT" virtiofsd
"$ROOT/bin/virtiofsd" --version
