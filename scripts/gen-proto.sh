#!/usr/bin/env bash
# Regenerate the Python protobuf/gRPC code (and .pyi stubs) of nomad-vm's plugin protocol.
#
# Inputs:  proto/nomad_vm/plugin/proto/*.proto
# Outputs: src/nomad_vm/plugin/proto/{*_pb2.py,*_pb2_grpc.py,*_pb2.pyi,*_pb2_grpc.pyi}
#
# Needs grpcio-tools and mypy-protobuf in the interpreter used (default: the repo's .venv;
# override with PYTHON=/path/to/python). Works from any current directory.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo_root/.venv/bin/python}"
out_dir="$repo_root/src/nomad_vm/plugin/proto"

cd "$repo_root"

# protoc finds the mypy-protobuf plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) on PATH;
# they are installed next to the interpreter.
PATH="$(dirname "$python"):$PATH"
export PATH

# Drop stale outputs so a removed or renamed .proto leaves nothing behind.
mkdir -p "$out_dir"
find "$out_dir" -maxdepth 1 -type f \( -name '*_pb2.py' -o -name '*_pb2_grpc.py' \
    -o -name '*_pb2.pyi' -o -name '*_pb2_grpc.pyi' \) -delete

"$python" -m grpc_tools.protoc \
    -I proto \
    --python_out=src \
    --grpc_python_out=src \
    --mypy_out=src \
    --mypy_grpc_out=src \
    proto/nomad_vm/plugin/proto/*.proto

if [ ! -f "$out_dir/__init__.py" ]; then
    printf '"""Generated protobuf/gRPC code; regenerate with scripts/gen-proto.sh."""\n' \
        >"$out_dir/__init__.py"
fi

echo "generated: $(cd "$out_dir" && ls -- *_pb2*.py* | tr '\n' ' ')"
