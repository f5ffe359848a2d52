#!/usr/bin/env bash
# Provide a Nomad binary at .tools/bin/nomad.
#
# A `nomad` already on PATH is used as it is. Otherwise the pinned release is built from its Go
# module with the ordinary Go toolchain and module proxy. `go install github.com/hashicorp/nomad@v`
# refuses because Nomad's go.mod has replace directives, so tools/nomad/ is a small wrapper module
# that requires Nomad at that version and repeats its replace directives (nomad/api pinned to the
# release's own commit). The Go build and module caches make a rebuild on the same machine quick.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.tools/bin/nomad
WANT=$(sed -n 's#^require github.com/hashicorp/nomad v\(.*\)#\1#p' tools/nomad/go.mod)

if [[ -x $BIN ]] && "$BIN" version 2>/dev/null | grep -q "Nomad v"; then
    exit 0
fi
mkdir -p .tools/bin
if existing=$(PATH=$(echo "$PATH" | tr ':' '\n' | grep -v "$PWD/.tools/bin" | paste -sd:) command -v nomad); then
    echo "using nomad from PATH: $existing ($("$existing" version | head -1))"
    ln -sf "$existing" "$BIN"
    exit 0
fi
command -v go >/dev/null || { echo "Go is needed to build Nomad: install Go 1.25 or newer" >&2; exit 1; }
echo "building Nomad v$WANT from its Go module (first time: several minutes)"
(cd tools/nomad && CGO_ENABLED=1 go build -trimpath -o "../../$BIN.tmp" github.com/hashicorp/nomad)
mv "$BIN.tmp" "$BIN"
"$BIN" version | head -1
