#!/usr/bin/env bash
# Builds the browser console into console/dist/ (gitignored): the console
# crate for wasm32 (through scripts/build-wasm.sh, so both of its toolchain
# paths work), bound by `wasm-bindgen --target web` into dist/pkg/, beside
# the page's own files from console/web/. sync-server embeds console/dist/
# when it is built after this (sync-server/build.rs), or serves it with
# --ui-dir console/dist.
# `--wasm-bindgen-version` prints the wasm-bindgen version Cargo.lock pins,
# the one wasm-bindgen-cli must have (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

locked_version() {
  awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock
}

if [ "${1:-}" = --wasm-bindgen-version ]; then
  locked_version
  exit
fi

want=$(locked_version)
have=$(wasm-bindgen --version 2>/dev/null || true)
if [ "$have" != "wasm-bindgen $want" ]; then
  echo "build-console: need wasm-bindgen $want, found '${have:-none}'; run scripts/setup.sh" >&2
  exit 1
fi

scripts/build-wasm.sh etcd-mesh-console
target=${CARGO_TARGET_DIR:-target}
out=console/dist
rm -rf "$out.new"
mkdir -p "$out.new/pkg"
wasm-bindgen --target web --no-typescript --out-dir "$out.new/pkg" \
  "$target/wasm32-unknown-unknown/wasm/etcd_mesh_console.wasm"
cp console/web/index.html console/web/console.css console/web/console.js "$out.new/"
# Swapped whole, so a server reading dist/ never sees half a build.
rm -rf "$out"
mv "$out.new" "$out"
echo "build-console: $out"
