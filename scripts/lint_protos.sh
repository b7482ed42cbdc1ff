#!/usr/bin/env bash
# Lint the gRPC contract with buf (STANDARD rules, protos/buf.yaml).
# buf comes from the npm package @bufbuild/buf, pinned, installed once into a cache dir
# (LLAMA_CRAB_TOOLS, default ~/.cache/llama-crab/tools) — the same place tests/test_protos.py uses.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION="${BUF_VERSION:-1.75.0}"
tools="${LLAMA_CRAB_TOOLS:-$HOME/.cache/llama-crab/tools}/buf-$BUF_VERSION"
buf="$tools/node_modules/.bin/buf"
if [ ! -x "$buf" ]; then
  command -v npm >/dev/null || { echo "lint_protos.sh: npm is needed to install @bufbuild/buf" >&2; exit 1; }
  mkdir -p "$tools"
  npm install --prefix "$tools" --no-audit --no-fund --silent "@bufbuild/buf@$BUF_VERSION" >&2
fi
"$buf" lint protos
echo "buf lint: protos/ clean ($("$buf" --version))"
