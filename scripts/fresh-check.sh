#!/usr/bin/env bash
# make fresh-check: the README's two commands (`make demo`, `make test`) in a
# fresh clone of HEAD, as on a machine that has never run them:
# - an empty cargo home and install root (CARGO_HOME, CARGO_INSTALL_ROOT), so
#   wasm-bindgen-cli and cargo-nextest are installed by the set-up, not found
#   (cargo also looks for subcommands in $CARGO_HOME/bin); only the crate
#   download cache is shared, to save downloading it again;
# - an empty virtual environment and no node_modules (a fresh clone has none);
# - a PATH of the Rust toolchain (rustup's proxies alone) and Debian's
#   directories: no ~/.cargo/bin tools, no /usr/local/bin, no pyenv, so
#   nothing installed earlier by cargo install, pip or npm can be found.
# Debian's packages stay (apt-get is how the set-up installs them). Prints
# how long each command took; the clone is removed afterwards unless
# KEEP=1. Committed work only: the clone is of HEAD.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-fresh.XXXXXX")
keep=${KEEP:-0}
cleanup() {
  if [ "$keep" = 1 ]; then
    echo "fresh-check: kept $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  echo "fresh-check: uncommitted changes are not checked (the clone is of HEAD)" >&2
fi
git clone -q --no-local "$repo" "$work/sluice"
checked=$(git -C "$work/sluice" rev-parse --short HEAD)
# CI runs with shared/ beside the clone.
[ -d "$repo/../shared" ] && cp -r "$repo/../shared" "$work/shared"

# The toolchain: rustup and its proxies, nothing `cargo install` put there.
toolchain="$work/toolchain-bin"
mkdir -p "$toolchain" "$work/cargo-root" "$work/cargo-home"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
cargo_bin="$cargo_home/bin"
[ -d "$cargo_home/registry" ] && ln -s "$cargo_home/registry" "$work/cargo-home/registry"
for proxy in rustup cargo rustc rustdoc rustfmt cargo-fmt cargo-clippy clippy-driver \
  cargo-miri rust-gdb rust-gdbgui rust-lldb rust-analyzer; do
  [ -e "$cargo_bin/$proxy" ] && ln -s "$cargo_bin/$proxy" "$toolchain/$proxy"
done
[ -e "$toolchain/cargo" ] || { echo "fresh-check: no cargo in $cargo_bin" >&2; exit 1; }

# The machine's package-client settings (certificates, a wheel directory)
# pass through: they say where packages come from, not which are installed.
machine_settings=()
while IFS= read -r var; do machine_settings+=("$var"); done < <(env | grep -E '^(PIP_|RUSTUP_AUTO_INSTALL=)' || true)
clean_env=(env -i
  HOME="$HOME" USER="${USER:-root}" LANG=C.UTF-8 TERM=dumb CI=true
  PATH="$toolchain:/usr/sbin:/usr/bin:/sbin:/bin"
  RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}"
  CARGO_HOME="$work/cargo-home" CARGO_INSTALL_ROOT="$work/cargo-root"
  "${machine_settings[@]}"
  # Any free port: a demo left running elsewhere must not fail the check.
  SLUICE_DEMO_PORT=0)

# Nothing of the above may see a tool from outside: prove it before starting.
for tool in cargo-nextest wasm-bindgen-test-runner envoy; do
  if found=$("${clean_env[@]}" bash -c "command -v $tool"); then
    echo "fresh-check: $tool is visible at $found; the check would not be from scratch" >&2
    exit 1
  fi
done

status=0
declare -A took
for cmd in demo test; do
  log="$work/make-$cmd.log"
  echo "fresh-check: make $cmd in $work/sluice (log: $log)" >&2
  start=$(date +%s)
  if (cd "$work/sluice" && "${clean_env[@]}" make "$cmd") >"$log" 2>&1 </dev/null; then
    result=passed
  else
    result="FAILED"
    status=1
    keep=1
  fi
  took[$cmd]="$(($(date +%s) - start)) s, $result"
  tail -n 5 "$log" | sed 's/^/    /' >&2
  [ "$result" = passed ] || break
done

echo
echo "fresh-check of $checked on $(hostname), $(date -u '+%Y-%m-%d %H:%M UTC')"
for cmd in demo test; do
  [ -n "${took[$cmd]:-}" ] && echo "  make $cmd: ${took[$cmd]}"
done
echo "  installed from scratch:"
for bin in "$work/cargo-root/bin/"* "$work/sluice/target/py/bin/envoy"; do
  [ -e "$bin" ] && echo "    $bin"
done
fallbacks=$(cat "$work"/make-*.log | grep 'fresh resolution' || true)
echo "  fell back to a fresh resolution: ${fallbacks:-none}"
exit "$status"
