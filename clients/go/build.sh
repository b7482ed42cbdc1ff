#!/usr/bin/env bash
# Build the Go example client (cmd/complete) from the contract, offline, with Debian's Go
# toolchain and libraries: generate the stubs with protoc into OUT_DIR, lay out a GOPATH
# tree there, `go build` in GOPATH mode (no module download), print the binary's path.
#
#   clients/go/build.sh OUT_DIR        # e.g. build/go-client
#   clients/go/build.sh --check        # only check the prerequisites (exit 1 naming what is missing)
#
# Installs nothing. Needs (Debian bookworm):
#   apt-get install golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc \
#     golang-google-grpc-dev golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev
# Generated code lands only in OUT_DIR; nothing is written to the source tree.
# GO_SYSTEM_GOPATH (default /usr/share/gocode) is where the Go library sources are.
set -euo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 OUT_DIR | --check" >&2
    exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
protos="$(cd "$here/../../protos" && pwd)"
system_gopath="${GO_SYSTEM_GOPATH:-/usr/share/gocode}"

missing=()
need_tool() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 (Debian package $2)"); }
need_src() { [ -e "$system_gopath/src/$1" ] || missing+=("$system_gopath/src/$1 (Debian package $2)"); }
need_tool go golang-go
need_tool protoc protobuf-compiler
need_tool protoc-gen-go protoc-gen-go
need_tool protoc-gen-go-grpc protoc-gen-go-grpc
need_src google.golang.org/grpc golang-google-grpc-dev
need_src google.golang.org/protobuf golang-google-protobuf-dev
need_src google.golang.org/genproto/googleapis/rpc/errdetails golang-google-genproto-dev
# grpc-go's codec marshals through github.com/golang/protobuf/proto: v1.3 (Debian's
# golang-github-golang-protobuf-1-3-dev, what golang-google-grpc-dev pulls in by default)
# cannot marshal the APIv2 messages protoc-gen-go writes (it builds, then panics in
# makeOneOfMarshaler on CompleteRequest's oneof); v1.4+ is a shim over APIv2.
gpb="$system_gopath/src/github.com/golang/protobuf/proto/proto.go"
if [ ! -e "$gpb" ] || ! grep -q '"google.golang.org/protobuf/' "$gpb"; then
    missing+=("github.com/golang/protobuf >= 1.4 (Debian package golang-github-golang-protobuf-1-5-dev; it replaces golang-github-golang-protobuf-1-3-dev)")
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "$0: missing:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi
if [ "$1" = "--check" ]; then
    exit 0
fi

mkdir -p "$1"
out="$(cd "$1" && pwd)"
gopath="$out/gopath"
src="$gopath/src/llamacrab"
rm -rf "$src"
mkdir -p "$src/gen" "$out/bin"

# The .proto has no go_package: map it to the import path on the command line.
map="Mllama_crab/v1/llama_crab.proto=llamacrab/gen/v1;llamacrabv1"
protoc -I "$protos" \
    --go_out="$gopath/src" --go_opt="$map" \
    --go-grpc_out="$gopath/src" --go-grpc_opt="$map" \
    llama_crab/v1/llama_crab.proto

# The hand-written packages beside the generated one (copies: GOPATH mode and symlinks
# do not mix well).
cp -R "$here/client" "$here/cmd" "$src/"

# GOFLAGS cleared: module flags (-mod=...) are errors in GOPATH mode. The build cache is
# Go's own (GOCACHE, default ~/.cache/go-build), else one in OUT_DIR; -trimpath keeps its
# entries independent of OUT_DIR, so a build into a new directory reuses them.
if [ -z "${GOCACHE:-}" ] && [ -z "${HOME:-}" ] && [ -z "${XDG_CACHE_HOME:-}" ]; then
    export GOCACHE="$out/go-build-cache"
fi
GO111MODULE=off GOFLAGS= GOPROXY=off GOPATH="$gopath:$system_gopath" \
    go build -trimpath -o "$out/bin/llama-crab-complete" llamacrab/cmd/complete
echo "$out/bin/llama-crab-complete"
