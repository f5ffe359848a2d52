#!/usr/bin/env bash
# Provide a Consul binary at .tools/bin/consul (tests/e2e/test_script_check.py runs a dev agent:
# script checks need Consul, Nomad's own service provider does not run them).
#
# A `consul` already on PATH is used as it is. Otherwise the pinned release is built from its Go
# module with the ordinary Go toolchain and module proxy, like scripts/install-nomad.sh builds
# Nomad: tools/consul/ is a small wrapper module that requires Consul at that version and repeats
# its replace directives (see the comment in its go.mod). Consul release builds are pure Go
# (CGO_ENABLED=0). The Go build and module caches make a rebuild on the same machine quick.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.tools/bin/consul
WANT=$(sed -n 's#^require github.com/hashicorp/consul v\(.*\)#\1#p' tools/consul/go.mod)

if [[ -x $BIN ]] && "$BIN" version 2>/dev/null | grep -q "Consul v"; then
    exit 0
fi
mkdir -p .tools/bin
if existing=$(PATH=$(echo "$PATH" | tr ':' '\n' | grep -v "$PWD/.tools/bin" | paste -sd:) command -v consul); then
    echo "using consul from PATH: $existing ($("$existing" version | head -1))"
    ln -sf "$existing" "$BIN"
    exit 0
fi
command -v go >/dev/null || { echo "Go is needed to build Consul: install Go 1.25 or newer" >&2; exit 1; }
echo "building Consul v$WANT from its Go module (first time: several minutes)"
(cd tools/consul && CGO_ENABLED=0 go build -trimpath -o "../../$BIN.tmp" github.com/hashicorp/consul)
mv "$BIN.tmp" "$BIN"
"$BIN" version | head -1
