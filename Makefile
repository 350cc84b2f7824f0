# etcd-mesh. `make run` starts the demo mesh; `make test` runs every test.
# Both install what is missing first (scripts/setup.sh).

CARGO ?= cargo
WASM := target/wasm32-unknown-unknown/release/etcd_mesh_plugin.wasm

.PHONY: all setup wasm build run test lint bench clean

all: build

setup:
	@scripts/setup.sh

wasm: setup
	@scripts/build-wasm.sh

# The plugin .wasm and the native binaries (sync-server, demo).
build: wasm
	$(CARGO) build --release -p sync-server -p etcd-mesh-demo -p etcd-mesh-registration

# The demo: etcd, sync-server, three backends and Envoy on loopback.
run: build
	target/release/etcd-mesh-demo

# Unit tests, then end-to-end tests against real etcd and Envoy.
test: wasm
	$(CARGO) test --workspace

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@# The proxy-wasm glue only builds for wasm32; lint it there when rustup has the target.
	if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then \
	  $(CARGO) clippy -p etcd-mesh-plugin --target wasm32-unknown-unknown -- -D warnings; fi

# Benchmarks (not tests): bench/RESULTS.md and bench/results.png.
bench: build
	scripts/bench.sh

clean:
	$(CARGO) clean
