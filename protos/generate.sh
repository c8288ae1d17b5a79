#!/usr/bin/env bash
# Regenerate the Consortium API's Python code (protos/flexfed/proto/v1/*_pb2*.py[i]) from the
# .proto files, with code generators pinned to what works beside flwr's protobuf<7:
# grpcio-tools 1.70.0 (protoc 29.x, protobuf 5.29 gencode) and mypy-protobuf 3.6.0 (stubs).
# They live in their own virtual environment (grpcio-tools 1.70 wants protobuf<6).
#
#   protos/generate.sh           regenerate in place
#   protos/generate.sh --check   regenerate into a temporary folder; fail on any difference
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
venv="${FLEXFED_PROTOC_VENV:-$root/../.venv-protoc}"
if [ ! -x "$venv/bin/protoc-gen-mypy" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "grpcio-tools==1.70.0" "mypy-protobuf==3.6.0"
fi
out="$root"
if [ "${1:-}" = "--check" ]; then
    out="$(mktemp -d)"
    trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/flexfed/proto/v1"
(cd "$root" && PATH="$venv/bin:$PATH" "$venv/bin/python" -m grpc_tools.protoc -I . \
    --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
    flexfed/proto/v1/*.proto)
if [ "${1:-}" = "--check" ]; then
    status=0
    for f in "$out"/flexfed/proto/v1/*_pb2*; do
        name="flexfed/proto/v1/$(basename "$f")"
        if ! cmp -s "$f" "$root/$name"; then
            echo "protos: $name is out of date; run protos/generate.sh" >&2
            diff -u "$root/$name" "$f" | head -20 >&2 || true
            status=1
        fi
    done
    for f in "$root"/flexfed/proto/v1/*_pb2*; do
        [ -e "$out/flexfed/proto/v1/$(basename "$f")" ] || { echo "protos: stale $f" >&2; status=1; }
    done
    [ "$status" = 0 ] && echo "protos: generated code is current"
    exit "$status"
fi
echo "protos: regenerated $(ls "$root"/flexfed/proto/v1/*_pb2* | wc -l) files"
