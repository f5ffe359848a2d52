"""Generated protobuf/gRPC code; regenerate with scripts/gen-proto.sh."""
