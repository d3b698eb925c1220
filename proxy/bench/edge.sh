#!/usr/bin/env bash
# Benchmark at the edge: the same upstream behind our proxy, bare pingora (same rustls stack,
# none of our hooks), nginx, HAProxy and Caddy (Debian's), each as a reverse proxy over plain
# HTTP and over HTTPS, with the same wrk load: keep-alive, and a fresh connection (so a fresh
# TLS handshake) per request. Prints req/s, p50/p99 and the proxy processes' CPU microseconds
# per request for each, then the p99 of each at half of our proxy's keep-alive HTTPS rate, and
# the ratios the issue sets goals on. One certificate (ECDSA P-256) for every server.
# Needs: wrk nginx haproxy caddy openssl curl (apt-get install -y wrk nginx haproxy caddy).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DUR=${DUR:-8s}
CONNS=${CONNS:-64}
declare -A PID   # target name -> process whose CPU (with its direct children) is counted

mkdir -p "$WORK/state"
bench_cert
cat "$WORK/certs/bench.crt" "$WORK/certs/bench.key" > "$WORK/combined.pem"
CRT=$WORK/certs/bench.crt KEY=$WORK/certs/bench.key

"$BIN/examples/bench_upstream" 127.0.0.1:18081 & pids+=($!)

# Our proxy serves from a persisted snapshot; the locator URL points nowhere on purpose. wrk
# sends no usable SNI for an IP address, so the certificate is the default host's.
# One service "bench", one instance: the upstream (proxy/bench/routing.json).
cp proxy/bench/routing.json "$WORK/state/routing.json"
HADDOCK_COOKIE_KEY=bench-cookie-key-0123456789 RUST_LOG=error "$BIN/proxy" serve \
  --listen 127.0.0.1:18080 --tls-listen 127.0.0.1:18480 --tls-certs "$WORK/certs" \
  --tls-default-host bench.test --admin 127.0.0.1:18090 --locator http://127.0.0.1:1 \
  --service bench --state-dir "$WORK/state" --threads 2 2>"$WORK/proxy.log" & PID[proxy]=$!; pids+=($!)

# Bare pingora in the proxy's model (plain HTTP: a shard per thread, each with its own socket;
# HTTPS: one service of 2 threads), and `pingora1`, plain HTTP too as one service of 2 threads
# on one socket (the model before stop 23; its HTTPS rows are the same model as pingora's).
"$BIN/examples/bare_pingora" 127.0.0.1:18083 127.0.0.1:18081 2 127.0.0.1:18483 "$CRT" "$KEY" 2>"$WORK/pingora.log" \
  & PID[pingora]=$!; pids+=($!)
BARE_SHARDS=0 "$BIN/examples/bare_pingora" 127.0.0.1:18086 127.0.0.1:18081 2 127.0.0.1:18486 "$CRT" "$KEY" \
  2>"$WORK/pingora1.log" & PID[pingora1]=$!; pids+=($!)

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
    listen 127.0.0.1:18482 ssl;
    ssl_certificate $CRT;
    ssl_certificate_key $KEY;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
nginx -c "$WORK/nginx.conf" -g 'daemon off;' & PID[nginx]=$!; term_pids+=($!)

cat > "$WORK/haproxy.cfg" <<HAPROXY
global
  nbthread 2
  maxconn 4000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend plain
  bind 127.0.0.1:18084
  default_backend up
frontend tls
  bind 127.0.0.1:18484 ssl crt $WORK/combined.pem alpn h2,http/1.1
  default_backend up
backend up
  http-reuse always
  server u1 127.0.0.1:18081
HAPROXY
haproxy -f "$WORK/haproxy.cfg" -db 2>"$WORK/haproxy.log" & PID[haproxy]=$!; pids+=($!)

cat > "$WORK/Caddyfile" <<CADDY
{
  admin off
  auto_https off
  servers {
    protocols h1 h2
  }
}
http://:18085 {
  bind 127.0.0.1
  reverse_proxy 127.0.0.1:18081
}
https://:18485 {
  bind 127.0.0.1
  tls $CRT $KEY
  reverse_proxy 127.0.0.1:18081
}
CADDY
HOME=$WORK caddy run --config "$WORK/Caddyfile" --adapter caddyfile >"$WORK/caddy.log" 2>&1 \
  & PID[caddy]=$!; pids+=($!)

declare -A PLAIN=([proxy]=18080 [pingora]=18083 [pingora1]=18086 [nginx]=18082 [haproxy]=18084 [caddy]=18085)
declare -A TLS=([proxy]=18480 [pingora]=18483 [pingora1]=18486 [nginx]=18482 [haproxy]=18484 [caddy]=18485)
NAMES="proxy pingora pingora1 nginx haproxy caddy"
for name in $NAMES; do
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:${PLAIN[$name]}/" \
      && curl -sfk -o /dev/null "https://127.0.0.1:${TLS[$name]}/" && break
    sleep 0.1
  done
  curl -sfk -o /dev/null "https://127.0.0.1:${TLS[$name]}/" || { echo "$name does not answer over HTTPS" >&2; cat "$WORK/caddy.log" >&2; exit 1; }
done
COOKIE=$(curl -s -D - -o /dev/null http://127.0.0.1:18080/ | sed -n 's/^[Ss]et-[Cc]ookie: \(hsid=[^;]*\).*/\1/p')

# CPU ticks (user + system) of a process and its direct children (nginx's workers).
ticks() {
  local total=0 p
  for p in "$1" $(ps -o pid= --ppid "$1"); do
    total=$(( total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0) ))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)

declare -A RPS P99
# name scheme mode(ka|close) rate(0 = saturate)
run() {
  local name=$1 scheme=$2 mode=$3 rate=${4:-0} port url script="" hdrs=(-H "Cookie: $COOKIE")
  if [ "$scheme" = https ]; then port=${TLS[$name]}; else port=${PLAIN[$name]}; fi
  url="$scheme://127.0.0.1:$port/"
  [ "$mode" = ka ] || hdrs+=(-H "Connection: close")
  if [ "$rate" != 0 ]; then
    echo "function delay() return $(( CONNS * 1000 / rate )) end" > "$WORK/delay.lua"
    script="-s $WORK/delay.lua"
  fi
  local before after out reqs rps p50 p99 cpu
  before=$(ticks "${PID[$name]}")
  out=$(wrk -t2 -c"$CONNS" -d"$DUR" --latency "${hdrs[@]}" $script "$url")
  after=$(ticks "${PID[$name]}")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {print int($2)}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  cpu=$(( (after - before) * 1000000 / HZ / (reqs > 0 ? reqs : 1) ))
  local errors
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  printf '%-8s %-5s %-5s %8s req/s  p50 %8s  p99 %8s  %5s µs CPU/req %s\n' \
    "$name" "$scheme" "$mode" "$rps" "$p50" "$p99" "$cpu" "$errors"
  if [ "$rate" = 0 ]; then
    RPS[$name/$scheme/$mode]=$rps
    CPU[$name/$scheme/$mode]=$cpu
  fi
  P99[$name/$scheme/$mode/$rate]=$p99
}
declare -A CPU

echo "wrk -t2 -c$CONNS -d$DUR --latency; upstream: bench_upstream (hyper, 1 thread); $(nproc) cores; 2 worker threads/processes each"
for scheme in https http; do
  for mode in ka close; do
    for name in $NAMES; do
      run "$name" "$scheme" "$mode"
    done
  done
done
HALF=$(( RPS[proxy/https/ka] / 2 ))
echo "HTTPS keep-alive at half of our proxy's saturating rate (~$HALF req/s):"
for name in $NAMES; do
  run "$name" https ka "$HALF"
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
echo "ratios (goal in brackets):"
for scheme in https http; do
  for mode in ka close; do
    k=$scheme/$mode
    echo "  $k: CPU/req proxy/pingora $(ratio "${CPU[proxy/$k]}" "${CPU[pingora/$k]}") [<= 1.05]" \
      " req/s proxy/caddy $(ratio "${RPS[proxy/$k]}" "${RPS[caddy/$k]}") [>= 2]" \
      " req/s proxy/nginx $(ratio "${RPS[proxy/$k]}" "${RPS[nginx/$k]}") [>= 0.75]" \
      " (bare pingora/pingora1: CPU/req $(ratio "${CPU[pingora/$k]}" "${CPU[pingora1/$k]}"), req/s $(ratio "${RPS[pingora/$k]}" "${RPS[pingora1/$k]}"))"
  done
done
echo "  added p99 at half load: proxy ${P99[proxy/https/ka/$HALF]} vs nginx ${P99[nginx/https/ka/$HALF]} [<=]"
echo "proxy RSS: $(( $(awk '/VmRSS/ {print $2}' "/proc/${PID[proxy]}/status") / 1024 )) MiB"
