#!/usr/bin/env bash
# Benchmark: the same upstream reached directly, through nginx (Debian's), through bare pingora
# (examples/bare_pingora: the framework with none of our hooks) and through the proxy (with a
# sticky cookie), with the same wrk load. Prints req/s and p50/p99 per target, at
# saturation and at half of the proxy's saturating rate, then the proxy's RSS with 100 000
# tracked sessions. Needs: wrk, nginx (apt-get install -y wrk nginx), curl.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DUR=${DUR:-10s}
CONNS=${CONNS:-64}

"$BIN/examples/bench_upstream" 127.0.0.1:18081 & pids+=($!)

# The proxy serves from a persisted snapshot; the locator URL points nowhere on purpose.
mkdir -p "$WORK/state"
# One service "bench", one instance: the upstream (proxy/bench/routing.json).
cp proxy/bench/routing.json "$WORK/state/routing.json"
HADDOCK_COOKIE_KEY=bench-cookie-key-0123456789 RUST_LOG=error "$BIN/proxy" serve \
  --listen 127.0.0.1:18080 --admin 127.0.0.1:18090 --locator http://127.0.0.1:1 \
  --service bench --state-dir "$WORK/state" --threads "${PROXY_THREADS:-2}" & pids+=($!)

# The framework alone, same threads: what pingora costs before any of our hooks run.
"$BIN/examples/bare_pingora" 127.0.0.1:18083 127.0.0.1:18081 "${PROXY_THREADS:-2}" & pids+=($!)

cat > "$WORK/nginx.conf" <<NGINX
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log error;
events { worker_connections 4096; }
http {
  access_log off;
  upstream up { server 127.0.0.1:18081; keepalive 128; }
  server {
    listen 127.0.0.1:18082;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf" -g 'daemon off;' & term_pids+=($!)

for _ in $(seq 100); do
  curl -sf -o /dev/null http://127.0.0.1:18080/ && curl -sf -o /dev/null http://127.0.0.1:18082/ \
    && curl -sf -o /dev/null http://127.0.0.1:18083/ && break
  sleep 0.1
done
COOKIE=$(curl -s -D - -o /dev/null http://127.0.0.1:18080/ | sed -n 's/^[Ss]et-[Cc]ookie: \(hsid=[^;]*\).*/\1/p')

# wrk prints "Requests/sec" and, with --latency, the 50 % / 99 % percentiles.
run() { # name url rate(0 = saturate) [header]
  local name=$1 url=$2 rate=$3 hdr=${4:-X-Bench: 1} script=""
  if [ "$rate" != 0 ]; then
    # Each connection waits so that all of them together send about $rate requests/s.
    echo "function delay() return $(( CONNS * 1000 / rate )) end" > "$WORK/delay.lua"
    script="-s $WORK/delay.lua"
  fi
  local out
  out=$(wrk -t2 -c"$CONNS" -d"$DUR" --latency -H "$hdr" $script "$url")
  printf '%-24s %10s req/s  p50 %8s  p99 %8s\n' "$name" \
    "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")"
  awk '/Requests\/sec/ {print int($2)}' <<<"$out" > "$WORK/last_rps"
}

echo "wrk -t2 -c$CONNS -d$DUR --latency, upstream: bench_upstream (hyper, 1 thread); $(nproc) cores"
run "direct" http://127.0.0.1:18081/ 0
run "nginx" http://127.0.0.1:18082/ 0
run "bare pingora" http://127.0.0.1:18083/ 0
run "proxy (sticky cookie)" http://127.0.0.1:18080/ 0 "Cookie: $COOKIE"
HALF=$(( $(cat "$WORK/last_rps") / 2 ))
echo "at half of the proxy's saturating rate (~$HALF req/s):"
run "direct @half" http://127.0.0.1:18081/ "$HALF"
run "nginx @half" http://127.0.0.1:18082/ "$HALF"
run "bare pingora @half" http://127.0.0.1:18083/ "$HALF"
run "proxy @half" http://127.0.0.1:18080/ "$HALF" "Cookie: $COOKIE"

# Sessions: cookie-less requests each create and track one; the count reached is printed.
wrk -t2 -c"$CONNS" -d"${SESSION_DUR:-15s}" http://127.0.0.1:18080/ > /dev/null 2>&1 || true
sessions=$(curl -s http://127.0.0.1:18090/routing | sed -n 's/.*"live_sessions":\([0-9]*\).*/\1/p')
rss=$(awk '/VmRSS/ {print $2}' "/proc/${pids[1]}/status")
echo "proxy RSS with $sessions live sessions: $(( rss / 1024 )) MiB"
