#!/usr/bin/env bash
# Extra Docker engines on this machine, each in its own network namespace, reached over TLS with
# client certificates like a real remote host (docs/development.md, "Test hosts").
#
#   ci/testhosts.sh up N          hosts 1..N up (already running ones are kept); prints DOCKER_HOST
#                                 and cert dir of each, writes $HADDOCK_TESTHOSTS_DIR/hb<i>/env
#   ci/testhosts.sh down          stops every test host, unmounts, removes netns, veths and all state
#   ci/testhosts.sh status        what is up
#   ci/testhosts.sh load IMAGE…   copies images from the machine's engine onto every running host
#   ci/testhosts.sh cut I         takes host I off the network (its veth down): a host lost
#                                 mid-release, its engine and containers still running
#   ci/testhosts.sh heal I        puts host I back on the network
#
# Host i: netns haddock-hb<i>, veth haddock-hb<i> 10.213.<i>.1/24 on the machine <-> eth0
# 10.213.<i>.2/24 inside, dockerd (with its own managed containerd) listening on
# tcp://10.213.<i>.2:2376 (TLS, client certificate required) and unix://…/hb<i>/docker.sock.
# The engines pull from registries on 10.213.0.0/16 over plain HTTP (--insecure-registry): a
# test registry on the machine side of a veth (10.213.<i>.1) needs no TLS.
# The hosts reach each other (and services on the machine's 10.213.<i>.1) through the
# machine: a route to 10.213.0.0/16 in each netns and one forwarding rule in DOCKER-USER, so
# that a container on host 1 reaches a port published on host 2 as a peer on another host would.
# Needs root. Exit 2: bad input, nothing changed.
set -euo pipefail

usage() {
  echo "usage: ci/testhosts.sh up N (1..8) | down | status | load IMAGE... | cut I | heal I" >&2
  exit 2
}

MAX_HOSTS=8
verb="${1:-}"
[ $# -gt 0 ] && shift
case "$verb" in
  up)
    [ $# -eq 1 ] || usage
    case "$1" in '' | *[!0-9]*) echo "error: N must be a number, got '$1'" >&2; usage ;; esac
    [ "${#1}" -le 2 ] && n=$((10#$1)) || n=99
    if [ "$n" -lt 1 ] || [ "$n" -gt "$MAX_HOSTS" ]; then
      echo "error: N must be between 1 and $MAX_HOSTS, got $1" >&2
      usage
    fi
    ;;
  down | status) [ $# -eq 0 ] || usage ;;
  load) [ $# -ge 1 ] || usage ;;
  cut | heal)
    [ $# -eq 1 ] || usage
    case "$1" in [1-8]) n="$1" ;; *) echo "error: I must be a host number 1..8, got '$1'" >&2; usage ;; esac
    ;;
  *)
    [ -n "$verb" ] && echo "error: unknown verb '$verb'" >&2
    usage
    ;;
esac

if [ "$(id -u)" != 0 ]; then
  echo "error: ci/testhosts.sh needs root (network namespaces, dockerd)" >&2
  exit 1
fi

# Everything of ours lives here (removed by `down`); the names below are ours alone.
ROOT=/var/tmp/haddock-testhosts
NS_PREFIX=haddock-hb   # netns haddock-hb<i>, machine-side veth haddock-hb<i>
PORT=2376
# The test engines' default bridge: 172.31.<i>.0/24, not the machine engine's 172.17.0.0/16.
bip() { echo "172.31.$1.1/24"; }
addr_machine() { echo "10.213.$1.1"; }
addr_host() { echo "10.213.$1.2"; }

# One verb at a time across the machine (several clones share these names). The test harness
# holds this lock for a test host's whole life and tells us so.
if [ -z "${HADDOCK_TESTHOSTS_LOCK_HELD:-}" ]; then
  exec 9>/run/lock/haddock-testhosts.lock
  flock 9
fi

install_missing() {
  local need=()
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v iptables >/dev/null 2>&1 || need+=(iptables)
  command -v openssl >/dev/null 2>&1 || need+=(openssl)
  command -v fuse-overlayfs >/dev/null 2>&1 || need+=(fuse-overlayfs)
  command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
  command -v flock >/dev/null 2>&1 || need+=(util-linux)
  if [ "${#need[@]}" -gt 0 ]; then
    echo "ci/testhosts.sh: installing ${need[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  command -v dockerd >/dev/null 2>&1 || { echo "error: dockerd not found (docker.io)" >&2; exit 1; }
}

# docker CLI against host i over TLS, as a remote client would.
hdocker() {
  local i="$1"
  shift
  docker --tlsverify --tlscacert "$ROOT/client/ca.pem" --tlscert "$ROOT/client/cert.pem" \
    --tlskey "$ROOT/client/key.pem" -H "tcp://$(addr_host "$i"):$PORT" "$@"
}

# Hosts with any trace on the machine: state dir, netns or veth.
known_hosts() {
  {
    for d in "$ROOT"/hb*; do [ -d "$d" ] && echo "${d##*/hb}"; done
    ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^$NS_PREFIX\([0-9]\+\)$/\1/p"
    ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed -n "s/^$NS_PREFIX\([0-9]\+\)\(@.*\)\?$/\1/p"
  } | sort -un
}

ossl() { openssl "$@" 2>/dev/null; }

# One CA and one client certificate for all hosts (made once).
make_ca() {
  local t="$ROOT/tls"
  [ -s "$ROOT/client/key.pem" ] && return 0
  mkdir -p "$t" "$ROOT/client"
  ossl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=haddock-testhosts-ca" \
    -keyout "$t/ca.key" -out "$t/ca.pem"
  printf 'extendedKeyUsage=clientAuth\n' >"$t/client.ext"
  ossl req -newkey rsa:2048 -nodes -subj "/CN=haddock-testhosts-client" \
    -keyout "$ROOT/client/key.pem" -out "$t/client.csr"
  ossl x509 -req -in "$t/client.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
    -days 30 -extfile "$t/client.ext" -out "$ROOT/client/cert.pem"
  cp "$t/ca.pem" "$ROOT/client/ca.pem"
}

# The server certificate of host i: IP SAN 10.213.<i>.2.
make_server_cert() {
  local i="$1" d="$ROOT/hb$1/tls" t="$ROOT/tls"
  [ -s "$d/server-key.pem" ] && return 0
  mkdir -p "$d"
  printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth\n' "$(addr_host "$i")" >"$d/server.ext"
  ossl req -newkey rsa:2048 -nodes -subj "/CN=$(addr_host "$i")" \
    -keyout "$d/server-key.pem" -out "$d/server.csr"
  ossl x509 -req -in "$d/server.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
    -days 30 -extfile "$d/server.ext" -out "$d/server-cert.pem"
  cp "$t/ca.pem" "$d/ca.pem"
}

make_netns() {
  local i="$1" ns="$NS_PREFIX$1"
  ip netns list | awk '{print $1}' | grep -qx "$ns" || ip netns add "$ns"
  if ! ip link show "$ns" >/dev/null 2>&1; then
    ip link add "$ns" type veth peer name eth0 netns "$ns"
    ip addr add "$(addr_machine "$i")/24" dev "$ns"
    ip link set "$ns" up
    ip -n "$ns" addr add "$(addr_host "$i")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  fi
  ip -n "$ns" route replace 10.213.0.0/16 via "$(addr_machine "$i")"
  # The machine's engine sets FORWARD's policy to DROP: let the test hosts reach each other.
  # (Docker makes DOCKER-USER; a machine engine run without iptables has none: FORWARD then.)
  local chain=DOCKER-USER
  iptables -S DOCKER-USER >/dev/null 2>&1 || chain=FORWARD
  iptables -C "$chain" -s 10.213.0.0/16 -d 10.213.0.0/16 -j ACCEPT 2>/dev/null ||
    iptables -I "$chain" -s 10.213.0.0/16 -d 10.213.0.0/16 -j ACCEPT
}

daemon_pid() {
  local f="$ROOT/hb$1/dockerd.pid" pid
  [ -s "$f" ] || return 1
  pid="$(cat "$f")"
  kill -0 "$pid" 2>/dev/null || return 1
  # A recycled pid is not ours: it must be a dockerd with our state dir.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--data-root $ROOT/hb$1/data" || return 1
  echo "$pid"
}

start_daemon() {
  local i="$1" d="$ROOT/hb$1"
  daemon_pid "$i" >/dev/null && return 0
  mkdir -p "$d/data" "$d/exec"
  # /etc/docker/daemon.json sets data-root and more: an empty config file instead.
  echo '{}' >"$ROOT/daemon.json"
  # nsenter --net, not `ip netns exec`: the latter remounts /sys for the namespace and dockerd
  # then dies with "Devices cgroup isn't mounted". setsid and no inherited descriptors: the
  # daemon outlives this script and whoever ran it.
  setsid nsenter --net="/var/run/netns/$NS_PREFIX$i" \
    dockerd --config-file "$ROOT/daemon.json" \
    --data-root "$d/data" --exec-root "$d/exec" --pidfile "$d/dockerd.pid" \
    -H "unix://$d/docker.sock" -H "tcp://$(addr_host "$i"):$PORT" \
    --tlsverify --tlscacert "$d/tls/ca.pem" --tlscert "$d/tls/server-cert.pem" \
    --tlskey "$d/tls/server-key.pem" \
    --storage-driver fuse-overlayfs --bip "$(bip "$i")" \
    --insecure-registry 10.213.0.0/16 \
    --log-driver json-file --log-opt max-size=10m \
    </dev/null >"$d/dockerd.log" 2>&1 9>&- &
  # setsid and nsenter exec (no fork): $! is dockerd.
  echo $! >"$d/launched.pid"
}

write_env() {
  local i="$1" d="$ROOT/hb$1"
  cat >"$d/env" <<EOF
# source me: the docker CLI talks to test host $i
export DOCKER_HOST=tcp://$(addr_host "$i"):$PORT
export DOCKER_TLS_VERIFY=1
export DOCKER_CERT_PATH=$ROOT/client
EOF
}

wait_ready() {
  local i="$1" deadline=$((SECONDS + 90))
  until hdocker "$i" info >/dev/null 2>&1; do
    if ! daemon_pid "$i" >/dev/null && ! kill -0 "$(cat "$ROOT/hb$i/launched.pid")" 2>/dev/null; then
      echo "error: test host $i: dockerd exited; last lines of $ROOT/hb$i/dockerd.log:" >&2
      tail -n 20 "$ROOT/hb$i/dockerd.log" >&2
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "error: test host $i did not answer on tcp://$(addr_host "$i"):$PORT within 90 s; $ROOT/hb$i/dockerd.log:" >&2
      tail -n 20 "$ROOT/hb$i/dockerd.log" >&2
      return 1
    fi
    sleep 0.25
  done
}

cmd_up() {
  local n="$1" i t0=$SECONDS
  install_missing
  mkdir -p "$ROOT"
  make_ca
  for i in $(seq 1 "$n"); do
    make_server_cert "$i"
    make_netns "$i"
    start_daemon "$i"
    write_env "$i"
  done
  for i in $(seq 1 "$n"); do
    wait_ready "$i"
  done
  for i in $(seq 1 "$n"); do
    echo "hb$i DOCKER_HOST=tcp://$(addr_host "$i"):$PORT DOCKER_CERT_PATH=$ROOT/client env=$ROOT/hb$i/env"
  done
  echo "ci/testhosts.sh: $n test host(s) up in $((SECONDS - t0)) s" >&2
}

# Our mounts (fuse-overlayfs layers, container netns files, shm), deepest first.
our_mounts() {
  awk -v root="$ROOT" '$5 == root || index($5, root "/") == 1 {print $5}' /proc/self/mountinfo |
    awk '{print length, $0}' | sort -rn | cut -d' ' -f2-
}

stop_host() {
  local i="$1" ns="$NS_PREFIX$1" pid deadline
  if pid="$(daemon_pid "$i")"; then
    # Containers first, killed outright: dockerd's own shutdown gives each 10 s to stop.
    local sock="unix://$ROOT/hb$i/docker.sock" ids
    ids="$(timeout 20 docker -H "$sock" ps -aq 2>/dev/null || true)"
    [ -z "$ids" ] || timeout 60 docker -H "$sock" rm -f -v $ids >/dev/null 2>&1 || true
    kill -TERM "$pid"
    deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  # Whatever still runs in the namespace is ours (containerd, shims, docker-proxy): TERM, KILL.
  if ip netns list | awk '{print $1}' | grep -qx "$ns"; then
    local pids
    pids="$(ip netns pids "$ns" || true)"
    if [ -n "$pids" ]; then
      kill -TERM $pids 2>/dev/null || true
      deadline=$((SECONDS + 10))
      while [ -n "$(ip netns pids "$ns" || true)" ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
      pids="$(ip netns pids "$ns" || true)"
      [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    fi
  fi
}

cmd_down() {
  local i m
  local hosts
  hosts="$(known_hosts)"
  # In parallel: each dockerd takes 2-3 s to shut down.
  for i in $hosts; do stop_host "$i" & done
  wait
  for m in $(our_mounts); do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  if [ -n "$(our_mounts)" ]; then
    echo "error: still mounted under $ROOT (state kept):" >&2
    our_mounts >&2
    exit 1
  fi
  for i in $hosts; do
    ip route del unreachable "10.213.$i.0/24" 2>/dev/null || true
    ip link del "$NS_PREFIX$i" 2>/dev/null || true
    ip netns del "$NS_PREFIX$i" 2>/dev/null || true
  done
  rm -rf --one-file-system "$ROOT"
  for chain in DOCKER-USER FORWARD; do
    while iptables -D "$chain" -s 10.213.0.0/16 -d 10.213.0.0/16 -j ACCEPT 2>/dev/null; do :; done
  done
  # containerd's shims put their sockets in /run/containerd/s whatever the state dir; the
  # machine's engine had none there if it is empty now.
  rmdir /run/containerd/s /run/containerd 2>/dev/null || true
  [ -z "$hosts" ] || echo "ci/testhosts.sh: test host(s) $(echo $hosts) down" >&2
}

cmd_status() {
  local i pid hosts
  hosts="$(known_hosts)"
  if [ -z "$hosts" ]; then
    echo "no test hosts"
    return 0
  fi
  for i in $hosts; do
    pid="$(daemon_pid "$i" || echo -)"
    if [ "$pid" != - ] && v="$(hdocker "$i" version --format '{{.Server.Version}}' 2>/dev/null)"; then
      echo "hb$i up: dockerd pid $pid, engine $v, $(hdocker "$i" ps -q | wc -l) container(s), DOCKER_HOST=tcp://$(addr_host "$i"):$PORT env=$ROOT/hb$i/env"
    else
      echo "hb$i not answering (dockerd pid $pid); ci/testhosts.sh down cleans up"
    fi
  done
}

cmd_load() {
  local i hosts any=""
  hosts="$(known_hosts)"
  local size
  size="$(docker image inspect --format '{{.Size}}' "$@" | awk '{s += $1} END {printf "%.1f MB", s / 1e6}')"
  for i in $hosts; do
    daemon_pid "$i" >/dev/null || continue
    any=1
    local t0
    t0=$(date +%s%N)
    docker save "$@" | hdocker "$i" load -q >&2
    echo "ci/testhosts.sh: loaded $* ($size) onto hb$i in $((($(date +%s%N) - t0) / 1000000)) ms" >&2
  done
  if [ -z "$any" ]; then
    echo "error: no test host is running (ci/testhosts.sh up N first)" >&2
    exit 1
  fi
}

# A lost host as a LAN shows it: its link goes down and its subnet answers "no route to host"
# at once (as after a failed ARP lookup), rather than leaking to the default route and hanging.
cmd_cut() {
  ip link show "$NS_PREFIX$1" >/dev/null 2>&1 || { echo "error: test host $1 is not up" >&2; exit 2; }
  local net="10.213.$1.0/24"
  if [ "$2" = down ]; then
    ip link set "$NS_PREFIX$1" down
    ip route replace unreachable "$net"
  else
    ip route del unreachable "$net" 2>/dev/null || true
    ip link set "$NS_PREFIX$1" up
    ip addr replace "$(addr_machine "$1")/24" dev "$NS_PREFIX$1"
  fi
  echo "ci/testhosts.sh: hb$1 link $2" >&2
}

case "$verb" in
  up) cmd_up "$n" ;;
  cut) cmd_cut "$n" down ;;
  heal) cmd_cut "$n" up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  load) cmd_load "$@" ;;
esac
