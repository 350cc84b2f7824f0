#!/usr/bin/env bash
# Builds the plugin to target/wasm32-unknown-unknown/wasm/etcd_mesh_plugin.wasm,
# or another package for wasm32 when named (`build-wasm.sh etcd-mesh-console`),
# with the `wasm` profile (release, with panic = "abort"; see Cargo.toml).
# With rustup's wasm32 target when it is installed; otherwise with Debian's
# rustc-web, which builds the standard library from its own source (slower
# the first time, same artifact path). `--check` only says whether a way exists.
# Arguments after the package go to cargo; the benchmark's module with the
# noop role is `CARGO_TARGET_DIR=target/bench-noop build-wasm.sh
# etcd-mesh-plugin --features bench-noop` (its own target dir, so the shipped
# module at the path above is never the featured one).
set -euo pipefail
cd "$(dirname "$0")/.."

has_rustup_target() {
  command -v rustup >/dev/null && rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown
}
has_debian_fallback() {
  [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] &&
    [ -d "$(/usr/bin/rustc --print sysroot)/lib/rustlib/src/rust/library" ]
}

if [ "${1:-}" = --check ]; then
  has_rustup_target || has_debian_fallback
  exit
fi

package=${1:-etcd-mesh-plugin}
if [ $# -gt 0 ]; then shift; fi
if has_rustup_target; then
  exec cargo build --profile wasm --target wasm32-unknown-unknown -p "$package" "$@"
elif has_debian_fallback; then
  RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 exec /usr/bin/cargo build --profile wasm \
    --target wasm32-unknown-unknown -p "$package" -Zbuild-std=std,panic_abort "$@"
else
  echo "build-wasm: no wasm32 toolchain; run scripts/setup.sh" >&2
  exit 1
fi
