#!/usr/bin/env bash
# Regenerate the committed gRPC stubs from protocol/proto/*.proto (never edit the stubs by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protocol/proto/worker.proto
