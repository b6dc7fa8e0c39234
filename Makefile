# One task runner: every command in the README is a target here.
SHELL := /bin/bash
WASM := target/wasm32-wasip1/release/sluice_filter.wasm
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: deps build wasm wasm-image test test-wasm lint fmt bench bench-prober demo clean

deps:
	@scripts/deps.sh

wasm:
	cargo build --release --target wasm32-wasip1 -p sluice-filter -p sluice-empty-filter
	@ls -l $(WASM)

# The filter as an OCI image for Istio's WasmPlugin, built without a Docker
# daemon (buildah), as an OCI layout directory. Push it with
#   skopeo copy oci:target/wasm-image:$(WASM_IMAGE_TAG) docker://REGISTRY/sluice-filter:$(WASM_IMAGE_TAG)
WASM_IMAGE_TAG ?= 0.1.0
wasm-image: wasm
	scripts/wasm-image.sh $(WASM) target/wasm-image $(WASM_IMAGE_TAG)

build: wasm
	cargo build --release -p sluice-backend -p sluice-prober

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p sluice-filter -p sluice-core --target wasm32-wasip1 -- -D warnings

fmt:
	cargo fmt --all

# The whole suite: unit tests, the admission core on wasm under Node, and the
# end-to-end tests that run the real Envoy, Redis and binaries.
# The last line totals every runner's results (cargo's own last lines are
# doc-test runs that are usually empty).
test: deps lint wasm
	cargo build --release -p sluice-backend -p sluice-prober
	set -o pipefail; { $(MAKE) --no-print-directory test-wasm && \
	  cargo test --workspace --release -- --test-threads=1; } 2>&1 | tee target/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "%d passed, %d failed\n", p, f}' target/test.log

test-wasm:
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner \
	  cargo test -p sluice-core --target wasm32-unknown-unknown

# Figures for the README: side by side in one run, printed as markdown.
bench: deps wasm
	cargo build --release -p sluice-backend -p sluice-bench
	target/release/sluice-bench

# Repeatability of probes and the load generator against wrk.
bench-prober: deps
	cargo build --release -p sluice-backend -p sluice-prober
	bench/prober.sh

# The same burst against a capacity-4 service, without and with Sluice.
demo: deps wasm
	cargo build --release -p sluice-backend -p sluice-demo
	target/release/sluice-demo

clean:
	cargo clean
