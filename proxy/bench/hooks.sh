#!/usr/bin/env bash
# What our hooks cost, measured finely enough to tell 5 % apart on a noisy machine: our proxy
# and bare pingora (examples/bare_pingora, the same model: plain HTTP in shards, HTTPS one
# service) behind the same upstream, alternated ROUNDS times (default 7) with the same wrk load,
# over plain HTTP and HTTPS with keep-alive. Prints each round's CPU microseconds per request
# (the process's user + system time over the requests wrk counted) and, per scheme, the
# median of the rounds' ratios ours/bare. A single run of edge.sh moved by up to 25 % between
# two identical servers here; a median over alternated rounds is what the ≤ 1.05 goal can be
# judged by. Needs: wrk openssl curl.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
DUR=${DUR:-4s}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-7}

mkdir -p "$WORK/state"
bench_cert

"$BIN/examples/bench_upstream" 127.0.0.1:18081 & pids+=($!)
# One service "bench", one instance: the upstream (proxy/bench/routing.json).
cp proxy/bench/routing.json "$WORK/state/routing.json"
HADDOCK_COOKIE_KEY=bench-cookie-key-0123456789 RUST_LOG=error "$BIN/proxy" serve \
  --listen 127.0.0.1:18080 --tls-listen 127.0.0.1:18480 --tls-certs "$WORK/certs" \
  --tls-default-host bench.test --admin 127.0.0.1:18090 --locator http://127.0.0.1:1 \
  --service bench --state-dir "$WORK/state" --threads 2 2>"$WORK/proxy.log" & ours=$!; pids+=($!)
"$BIN/examples/bare_pingora" 127.0.0.1:18083 127.0.0.1:18081 2 127.0.0.1:18483 \
  "$WORK/certs/bench.crt" "$WORK/certs/bench.key" 2>"$WORK/pingora.log" & bare=$!; pids+=($!)
for port in 18080 18083; do
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done
COOKIE=$(curl -s -D - -o /dev/null http://127.0.0.1:18080/ | sed -n 's/^[Ss]et-[Cc]ookie: \(hsid=[^;]*\).*/\1/p')
HZ=$(getconf CLK_TCK)

# pid url → "µs-CPU-per-request req/s"
measure() {
  local before after out reqs
  before=$(awk '{print $14 + $15}' "/proc/$1/stat")
  out=$(wrk -t2 -c"$CONNS" -d"$DUR" -H "Cookie: $COOKIE" "$2")
  after=$(awk '{print $14 + $15}' "/proc/$1/stat")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  awk -v t="$((after - before))" -v hz="$HZ" -v n="$reqs" -v r="$(awk '/Requests\/sec/ {print int($2)}' <<<"$out")" \
    'BEGIN { printf "%.1f %d", t * 1e6 / hz / (n > 0 ? n : 1), r }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

echo "wrk -t2 -c$CONNS -d$DUR, keep-alive, $ROUNDS alternated rounds; $(nproc) cores; 2 threads each"
for scheme in http https; do
  if [ "$scheme" = http ]; then ours_url=http://127.0.0.1:18080/ bare_url=http://127.0.0.1:18083/
  else ours_url=https://127.0.0.1:18480/ bare_url=https://127.0.0.1:18483/; fi
  ratios=()
  for round in $(seq "$ROUNDS"); do
    # Alternate which goes first, so that a drift of the machine within a round cancels out.
    if [ $((round % 2)) = 1 ]; then
      o=$(measure "$ours" "$ours_url"); b=$(measure "$bare" "$bare_url")
    else
      b=$(measure "$bare" "$bare_url"); o=$(measure "$ours" "$ours_url")
    fi
    r=$(awk -v o="${o% *}" -v b="${b% *}" 'BEGIN { printf "%.3f", o / b }')
    ratios+=("$r")
    printf '%-5s round %d: ours %6s µs/req %6s req/s   bare %6s µs/req %6s req/s   ratio %s\n' \
      "$scheme" "$round" "${o% *}" "${o#* }" "${b% *}" "${b#* }" "$r"
  done
  echo "$scheme keep-alive: median CPU/req ours/bare $(printf '%s\n' "${ratios[@]}" | median) [<= 1.05]"
done
