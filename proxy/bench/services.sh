#!/usr/bin/env bash
# Memory per carried service: one proxy carrying 1, 10, 100 and 300 services (each with its own
# host, two instances and a routing table, served from a persisted snapshot), its RSS after
# every service has answered one request, and the cost of each service over the first.
# Needs: curl.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

"$BIN/examples/bench_upstream" 127.0.0.1:18181 & pids+=($!)

rss_with() { # n -> RSS in KiB of a proxy carrying n services, after one request to each
  local n=$1
  local dir=$WORK/state-$n
  mkdir -p "$dir"
  python3 - "$n" > "$dir/routing.json" <<'PY'
import json, sys
n = int(sys.argv[1])
services, instances = [], []
for i in range(n):
    name = f"s{i}"
    services.append({"name": name,
        "sessions": {"cookie_name": f"{name}_sid", "idle_ttl_ms": 600000, "max_drain_ms": 600000},
        "weights": {"1": 100}, "primary_version": "1", "revision": 1,
        "routes": {"hosts": [f"{name}.bench.test"]}})
    for j in range(2):
        instances.append({"id": f"{name}-{j}", "service": name, "version": "1",
            "address": "127.0.0.1:18181", "docker_host": "", "container_id": "", "labels": {},
            "state": "ready", "registered_at": 0, "last_heartbeat": 0,
            "load": {"live_sessions": 0, "in_flight": 0}})
print(json.dumps({"revision": 1, "services": services, "instances": instances,
                  "releases": [], "traffic": {}}))
PY
  local list
  list=$(seq -s, -f 's%g' 0 $((n - 1)))
  HADDOCK_COOKIE_KEY=bench-cookie-key-0123456789 RUST_LOG=error "$BIN/proxy" serve \
    --listen 127.0.0.1:18180 --admin 127.0.0.1:18190 --locator http://127.0.0.1:1 \
    --service "$list" --state-dir "$dir" --threads 2 & local pid=$!
  for _ in $(seq 100); do curl -sf -o /dev/null -H "Host: s0.bench.test" http://127.0.0.1:18180/ && break; sleep 0.1; done
  for i in $(seq 0 $((n - 1))); do
    curl -sf -o /dev/null -H "Host: s$i.bench.test" http://127.0.0.1:18180/ || { echo "s$i not served" >&2; exit 1; }
  done
  awk '/VmRSS/ {print $2}' "/proc/$pid/status"
  kill -KILL "$pid"; wait "$pid" 2>/dev/null || true
}

base=$(rss_with 1)
printf '%5s services: RSS %6d KiB\n' 1 "$base"
for n in 10 100 300; do
  rss=$(rss_with "$n")
  printf '%5s services: RSS %6d KiB  (%d KiB per service over the first)\n' "$n" "$rss" $(( (rss - base) / (n - 1) ))
done
