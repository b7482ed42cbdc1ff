#!/usr/bin/env bash
# Run the Node client's tests against a real server: start `llama-crab serve` on a free
# port (the default catalogue model unless LLAMA_CRAB_MODEL says otherwise), wait until
# it serves, run `npm test`, stop the server. Needs `llama-crab` installed and `npm ci` done.
set -euo pipefail
cd "$(dirname "$0")"
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
llama-crab serve --host 127.0.0.1 --port "$port" --http-port off --n-ctx 1024 --parallel 2 >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -f "$log"' EXIT
serving=0
for _ in $(seq 1 120); do
  if python - "$port" <<'PY' 2>/dev/null; then serving=1; break; fi
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}") as ch:
    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
  if ! kill -0 "$server" 2>/dev/null; then cat "$log" >&2; echo "test-live.sh: the server exited" >&2; exit 1; fi
  sleep 1
done
if [ "$serving" != 1 ]; then cat "$log" >&2; echo "test-live.sh: the server did not start serving" >&2; exit 1; fi
LLAMA_CRAB_SERVER="127.0.0.1:$port" npm test
