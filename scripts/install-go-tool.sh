#!/usr/bin/env bash
# Provide a HashiCorp binary at .tools/bin/NAME: `install-go-tool.sh nomad|consul`.
#
# A NAME already on PATH is used as it is. Otherwise the pinned release is built from its Go
# module with the ordinary Go toolchain and module proxy. `go install github.com/hashicorp/NAME@v`
# refuses because their go.mod files have replace directives, so tools/NAME/ is a small wrapper
# module that requires the release and repeats its replace directives (its go.mod says how each
# is pinned). The Go build and module caches make a rebuild on the same machine quick.
#   nomad:  Nomad v1.11.3, the agent the e2e tests and `make demo` run (built with cgo, as
#           Nomad's releases are), the newest 1.x the module proxy serves (2.x tags are not
#           valid module versions).
#   consul: Consul v1.22.7, only for tests/e2e/test_script_check.py (script checks need Consul:
#           Nomad's own service provider does not run them); pure Go, as its releases are.
set -euo pipefail
NAME=${1:?usage: install-go-tool.sh nomad|consul}
case $NAME in
    nomad) TITLE=Nomad; CGO=1 ;;
    consul) TITLE=Consul; CGO=0 ;;
    *) echo "install-go-tool.sh: unknown tool $NAME (nomad or consul)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
BIN=.tools/bin/$NAME
WANT=$(sed -n "s#^require github.com/hashicorp/$NAME v\(.*\)#\1#p" "tools/$NAME/go.mod")

# Version output is captured whole, never piped into `head`/`grep -q`: they stop reading early,
# the tool dies of SIGPIPE (Consul prints several lines) and pipefail turns that into a failure.
first_line() { local out; out=$("$1" version 2>/dev/null) || return 1; echo "${out%%$'\n'*}"; }

# A binary built for an older pin is rebuilt (one linked from PATH is linked again below).
if [[ -x $BIN ]] && have=$(first_line "$BIN") && [[ $have == "$TITLE v$WANT" || $have == "$TITLE v$WANT "* ]]; then
    exit 0
fi
mkdir -p .tools/bin
if existing=$(PATH=$(echo "$PATH" | tr ':' '\n' | grep -v "$PWD/.tools/bin" | paste -sd:) command -v "$NAME"); then
    echo "using $NAME from PATH: $existing ($(first_line "$existing"))"
    ln -sf "$existing" "$BIN"
    exit 0
fi
command -v go >/dev/null || { echo "Go is needed to build $TITLE: install Go 1.25.9 or newer" >&2; exit 1; }
echo "building $TITLE v$WANT from its Go module (first time: several minutes)"
(cd "tools/$NAME" && CGO_ENABLED=$CGO go build -trimpath -o "../../$BIN.tmp" "github.com/hashicorp/$NAME")
mv "$BIN.tmp" "$BIN"
first_line "$BIN"
