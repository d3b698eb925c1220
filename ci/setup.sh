# Sourced by every script in ci/ (and by .ci/run): installs the system packages Haddock's build
# and tests need on a Debian machine, and points cargo at the shared build directory.
# Idempotent; takes a second when everything is already there.
# shellcheck shell=bash

haddock_need=()
command -v cmake >/dev/null 2>&1 || haddock_need+=(cmake)            # pingora's zlib-ng
command -v clang >/dev/null 2>&1 || haddock_need+=(clang)            # rocksdb's bindgen
dpkg -s libclang-dev >/dev/null 2>&1 || haddock_need+=(libclang-dev)
command -v pkg-config >/dev/null 2>&1 || haddock_need+=(pkg-config)
command -v g++ >/dev/null 2>&1 || haddock_need+=(g++)                # rocksdb's C++
if [ -n "${HADDOCK_NEED_POSTGRES:-}" ]; then
  # The locator's PostgreSQL tests start their own server from Debian's binaries.
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || haddock_need+=(postgresql)
fi
if [ -n "${HADDOCK_NEED_POSTGRES:-}" ]; then
  # haddock's multi-host test reaches the engine as a second, TLS-protected tcp:// host.
  command -v stunnel >/dev/null 2>&1 || haddock_need+=(stunnel4)
  command -v openssl >/dev/null 2>&1 || haddock_need+=(openssl)
  # haddock's test-host test starts a second engine with ci/testhosts.sh (which installs these
  # itself too when run by hand).
  command -v ip >/dev/null 2>&1 || haddock_need+=(iproute2)
  command -v fuse-overlayfs >/dev/null 2>&1 || haddock_need+=(fuse-overlayfs)
  command -v nsenter >/dev/null 2>&1 || haddock_need+=(util-linux)
  command -v flock >/dev/null 2>&1 || haddock_need+=(util-linux)
  # haddock's registry test runs Debian's registry (Distribution 2.8) as plain processes. On a
  # machine booted with systemd the package also enables its own service on :5000; the tests do
  # not use it (`systemctl disable --now docker-registry` if unwanted).
  [ -x /usr/bin/docker-registry ] || haddock_need+=(docker-registry)
  # The DNS cache accessory's image (ci/build-images.sh --component dnsmasq) is Debian's dnsmasq.
  [ -x /usr/sbin/dnsmasq ] || haddock_need+=(dnsmasq-base)
  # The custom-checks test queries Debian's Prometheus scraping the proxies.
  [ -x /usr/bin/prometheus ] || haddock_need+=(prometheus)
  # The proxy's ACME test gets certificates from Debian's pebble (Let's Encrypt's test CA),
  # with pebble-challtestsrv as its DNS.
  [ -x /usr/bin/pebble ] || haddock_need+=(pebble)
fi
if [ -n "${HADDOCK_NEED_BROWSER:-}${HADDOCK_NEED_POSTGRES:-}" ]; then
  # The locator's dashboard test drives Debian's chromium through chromedriver (every test run
  # needs it, so HADDOCK_NEED_POSTGRES implies it too).
  command -v chromedriver >/dev/null 2>&1 || haddock_need+=(chromium chromium-driver)
fi
if [ "${#haddock_need[@]}" -gt 0 ]; then
  echo "ci/setup.sh: installing ${haddock_need[*]}" >&2
  haddock_sudo=""
  [ "$(id -u)" = 0 ] || haddock_sudo=sudo
  $haddock_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $haddock_sudo apt-get install -y -qq --no-install-recommends "${haddock_need[@]}" >/dev/null
fi

# One build directory outside the clone, one profile (release) for build, clippy, tests and
# images: rocksdb's and pingora's C/C++ code compiles once per machine, not once per clone.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/haddock/target}"

# The Docker Engine is a hard requirement of the tests and the demo: fail loudly, never skip.
haddock_require_docker() {
  if ! docker info >/dev/null 2>&1; then
    echo "error: the Docker Engine is not reachable (is dockerd running, and may $(id -un) use /var/run/docker.sock?)." >&2
    echo "       Haddock's tests and demo run real containers; they refuse to skip." >&2
    exit 1
  fi
}

# PostgreSQL server binaries are a hard requirement of the locator's store tests.
haddock_require_postgres() {
  if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    echo "error: PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (apt-get install postgresql)." >&2
    exit 1
  fi
}
