#!/usr/bin/env bash
# Smoke test of compose/docker-compose.yml: brings the stack up under its own project name,
# network, volume and free host ports (so it cannot collide with a real `haddock` stack), then
# checks that
#   - the locator answers GET /healthz with 200,
#   - the proxy's admin port answers GET /healthz with 200,
#   - the proxy answers user traffic with its 503 JSON `no_ready_instance` (no release has
#     registered an instance in the locator yet; the compose optimizer is not registered),
#   - the optimizer container turns healthy (its image HEALTHCHECK),
#   - the DNS cache answers on its fixed address, and the optimizer is told to use it,
# and finally `down -v` and verifies that no container, volume or network of it is left.
#
#   ci/compose-check.sh [--build]     # --build: build the images first (ci/build-images.sh)
#
# Exits non-zero on any failure. Needs the images haddock/{locator,proxy}:0.1.0 and
# haddock/optimizer:1.0.0 (docker-compose 1.29 ignores pull_policy: a missing image would be pulled,
# so this script refuses to start without them).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/haddock/target}"
if [ "${1:-}" = --build ]; then
  bash "$root/ci/build-images.sh" --component locator 0.1.0
  bash "$root/ci/build-images.sh" --component proxy 0.1.0
  bash "$root/ci/build-images.sh" --format 1 1.0.0
  bash "$root/ci/build-images.sh" --component dnsmasq 1
fi
for img in haddock/locator:0.1.0 haddock/proxy:0.1.0 haddock/optimizer:1.0.0 haddock/dnsmasq:1; do
  docker image inspect "$img" >/dev/null 2>&1 || { echo "FAIL: image $img missing (run with --build)" >&2; exit 1; }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

project="haddockcheck$$"
export HADDOCK_NETWORK="$project" HADDOCK_CACHE_VOLUME="$project-cache"
export HADDOCK_DEPLOY_TOKEN="deploy-$RANDOM$RANDOM" HADDOCK_PROXY_TOKEN="proxy-$RANDOM$RANDOM"
export HADDOCK_COOKIE_KEY="cookie-key-$RANDOM$RANDOM$RANDOM"
export HADDOCK_OPTIMIZER_TOKEN="write-token-$RANDOM$RANDOM$RANDOM$RANDOM"
export HADDOCK_PROXY_BIND=127.0.0.1
# A subnet of its own for this check's network (a free one: another network may hold one).
for _ in $(seq 32); do
  net="10.$((100 + RANDOM % 100)).$((RANDOM % 256))"
  docker network ls -q | xargs -r docker network inspect -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' \
    | grep -q "$net\." || break
done
export HADDOCK_SUBNET="$net.0/24" HADDOCK_DNS_IP="$net.53"
HADDOCK_LOCATOR_PORT=$(free_port); HADDOCK_PROXY_PORT=$(free_port); HADDOCK_PROXY_ADMIN_PORT=$(free_port)
export HADDOCK_LOCATOR_PORT HADDOCK_PROXY_PORT HADDOCK_PROXY_ADMIN_PORT
dc() { docker-compose -f "$root/compose/docker-compose.yml" -p "$project" "$@"; }

failed=0
fail() { echo "FAIL: $*" >&2; failed=1; }
cleanup() {
  dc down -v --remove-orphans >/dev/null 2>&1 || true
}
trap cleanup EXIT

dc up -d

# Poll up to 60 s for: locator health, proxy admin health, proxy 503 JSON, optimizer healthy.
wait_for() { # description, command...
  local what="$1"; shift
  for _ in $(seq 120); do
    if "$@" >/dev/null 2>&1; then echo "ok: $what"; return 0; fi
    sleep 0.5
  done
  fail "$what"
  return 0
}
status_is() { [ "$(curl -s -o /dev/null -w '%{http_code}' "$2")" = "$1" ]; }
proxy_503_json() {
  local out
  out=$(curl -s -D - "http://127.0.0.1:$HADDOCK_PROXY_PORT/" ) || return 1
  grep -q '^HTTP/1.1 503' <<<"$out" && grep -qi '^content-type: application/json' <<<"$out" \
    && grep -q '"no_ready_instance"' <<<"$out"
}
optimizer_healthy() {
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$(dc ps -q optimizer)")" = healthy ]
}

wait_for "locator /healthz 200" status_is 200 "http://127.0.0.1:$HADDOCK_LOCATOR_PORT/healthz"
wait_for "proxy admin /healthz 200" status_is 200 "http://127.0.0.1:$HADDOCK_PROXY_ADMIN_PORT/healthz"
wait_for "proxy answers 503 JSON no_ready_instance" proxy_503_json
wait_for "optimizer container healthy" optimizer_healthy
# An A query for the cache's own record, straight to its fixed address on the bridge.
dns_answers() {
  python3 - "$HADDOCK_DNS_IP" <<'PY'
import socket, struct, sys
ip = sys.argv[1]
name = b"".join(bytes([len(p)]) + p for p in b"dns.haddock.internal".split(b"."))
query = struct.pack(">HHHHHH", 7, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.sendto(query, (ip, 53))
answer = s.recv(512)
assert struct.unpack(">H", answer[6:8])[0] >= 1 and answer[-4:] == socket.inet_aton(ip), answer
PY
}
wait_for "the DNS cache answers at $HADDOCK_DNS_IP" dns_answers
optimizer_uses_dns() {
  [ "$(docker inspect -f '{{json .HostConfig.Dns}}' "$(dc ps -q optimizer)")" = "[\"$HADDOCK_DNS_IP\"]" ]
}
wait_for "the optimizer resolves through the DNS cache" optimizer_uses_dns
# The proxy's token was accepted by the locator (a wrong one would be logged as 401).
if dc logs proxy 2>&1 | grep -q 'answered 401'; then fail "proxy token refused by the locator"; fi

# The release path: haddock (on this host) releases optimizer 1.0.0 into the stack, on its
# network and cache volume, through its locator; users then reach it through its proxy.
# The spec is deploy-specs/optimizer.toml with this check's network, volume and a label that
# the cleanup removes by (a real stack's optimizer containers are never touched).
spec="$(mktemp --suffix .toml)"
sed -e "s/^network = \"haddock\"/network = \"$HADDOCK_NETWORK\"/" \
    -e "s/{ name = \"optimizer-cache\", mount/{ name = \"$HADDOCK_CACHE_VOLUME\", mount/" \
    -e "s/^labels = { \"org.haddock.team\" = \"wan\" }/labels = { \"org.haddock.check\" = \"$project\" }/" \
    -e "s/OPTIMIZER_WRITE_TOKEN = \"[^\"]*\"/OPTIMIZER_WRITE_TOKEN = \"$HADDOCK_OPTIMIZER_TOKEN\"/" \
    "$root/deploy-specs/optimizer.toml" > "$spec"
# (A first release goes straight to 100 %: the canary steps only apply with a previous version.)
remove_released() {
  docker ps -aq --filter "label=org.haddock.check=$project" | xargs -r docker rm -f >/dev/null 2>&1 || true
}
cleanup() {
  remove_released
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  rm -f "$spec"
}
if "$CARGO_TARGET_DIR/release/haddock" release optimizer 1.0.0 --spec "$spec" \
    --locator "http://127.0.0.1:$HADDOCK_LOCATOR_PORT" --token "$HADDOCK_DEPLOY_TOKEN" --json; then
  echo "ok: haddock released optimizer 1.0.0 into the compose stack"
else
  fail "haddock release into the compose stack"
fi
put_then_get() {
  local url="http://127.0.0.1:$HADDOCK_PROXY_PORT/v1/objects/compose-check"
  curl -sf -X PUT -H "Authorization: Bearer $HADDOCK_OPTIMIZER_TOKEN" --data-binary "hello from $project" "$url" >/dev/null \
    && [ "$(curl -sf "$url")" = "hello from $project" ]
}
wait_for "PUT then GET of an object through the compose proxy" put_then_get
[ "$failed" = 0 ] || dc logs --tail 20 >&2 || true
remove_released

dc down -v --remove-orphans
trap - EXIT
left=$(docker ps -aq --filter "label=com.docker.compose.project=$project")
[ -z "$left" ] || fail "containers left: $left"
if docker volume ls -q | grep -q "^$project"; then fail "volumes left: $(docker volume ls -q | grep "^$project" | tr '\n' ' ')"; fi
if docker network ls --format '{{.Name}}' | grep -q "^$project"; then fail "network left"; fi
[ "$failed" = 0 ] && echo "ok: nothing left; compose check passed" || { echo "compose check FAILED" >&2; exit 1; }
