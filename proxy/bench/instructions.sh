#!/usr/bin/env bash
# What our hooks cost in instructions, which do not move with the machine's load: our proxy
# and bare pingora (examples/bare_pingora) each run under valgrind's callgrind behind the same
# upstream; after a warm-up the counters are zeroed, wrk sends the same keep-alive load with one
# session cookie to each (so every request after the first finds its token already opened:
# the best case of `opened_tokens`), and the instructions each whole process executed (every
# thread) are divided by the requests wrk counted. Prints both and the ratio ours/bare (the goal of hooks.sh is ≤ 1.05),
# then our functions' share per request (inclusive), to say where the difference goes.
# Plain HTTP only (callgrind makes TLS handshakes too slow to matter here). Needs: valgrind
# (callgrind_control, callgrind_annotate), wrk, curl.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DUR=${DUR:-15s}

"$BIN/examples/bench_upstream" 127.0.0.1:18081 & pids+=($!)
mkdir -p "$WORK/state"
cp proxy/bench/routing.json "$WORK/state/routing.json"
HADDOCK_COOKIE_KEY=bench-cookie-key-0123456789 RUST_LOG=error valgrind --tool=callgrind \
  --callgrind-out-file="$WORK/ours.%p" "$BIN/proxy" serve --listen 127.0.0.1:18080 \
  --admin 127.0.0.1:18090 --locator http://127.0.0.1:1 --service bench \
  --state-dir "$WORK/state" --threads 2 2>"$WORK/ours.log" & ours=$!; pids+=($!)
valgrind --tool=callgrind --callgrind-out-file="$WORK/bare.%p" "$BIN/examples/bare_pingora" \
  127.0.0.1:18083 127.0.0.1:18081 2 2>"$WORK/bare.log" & bare=$!; pids+=($!)
for port in 18080 18083; do
  for _ in $(seq 300); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
done
COOKIE=$(curl -s -D - -o /dev/null http://127.0.0.1:18080/ | sed -n 's/^[Ss]et-[Cc]ookie: \(hsid=[^;]*\).*/\1/p')
[ -n "$COOKIE" ] || { echo "the proxy gave no session cookie: $WORK/ours.log" >&2; exit 1; }

# name pid url → "instructions-per-request requests"
measure() {
  wrk -t1 -c4 -d2s -H "Cookie: $COOKIE" "$3" >/dev/null  # warm-up: pools, caches, lazy statics
  callgrind_control -z "$2" >/dev/null 2>>"$WORK/callgrind_control.log"
  local out reqs
  out=$(wrk -t1 -c4 -d"$DUR" -H "Cookie: $COOKIE" "$3")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  callgrind_control -d "$2" >/dev/null 2>>"$WORK/callgrind_control.log"
  local dump
  dump=$(ls -t "$WORK/$1.$2"* | head -1)
  [ "${reqs:-0}" -gt 0 ] || { echo "wrk counted no requests to $3" >&2; exit 1; }
  awk -v n="$reqs" '/^summary:|^totals:/ { t = $2 } END { printf "%.0f %d", t / n, n }' "$dump"
  cp "$dump" "$WORK/$1.last"
}

o=$(measure ours "$ours" http://127.0.0.1:18080/)
b=$(measure bare "$bare" http://127.0.0.1:18083/)
echo "callgrind, wrk -t1 -c4 -d$DUR, keep-alive, a session cookie; instructions per request"
printf 'ours %s (%s requests)   bare pingora %s (%s requests)   ratio %s [<= 1.05]\n' \
  "${o% *}" "${o#* }" "${b% *}" "${b#* }" "$(awk -v o="${o% *}" -v b="${b% *}" 'BEGIN { printf "%.3f", o / b }')"
echo "ours, inclusive per request:"
callgrind_annotate --inclusive=yes --threshold=100 "$WORK/ours.last" 2>/dev/null \
  | grep -E "HaddockProxy as pingora_proxy::proxy_trait::ProxyHttp>::[a-z_]+::\{\{closure\}\} |proxy::(request_head::head_len|session::CookieKeys::decode|edge::forwarded_for) " \
  | awk -v n="${o#* }" '{ gsub(",", "", $1); name = $0; sub(/.*\?\?\?:/, "", name); sub(/ \[.*/, "", name); printf "  %8.0f  %s\n", $1 / n, name }'
