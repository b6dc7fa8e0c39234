#!/usr/bin/env bash
# Builds the filter's OCI image without a Docker daemon (buildah, FROM
# scratch, one layer with plugin.wasm) and writes it as an OCI image layout
# directory, which skopeo or buildah can push to any registry:
#
#   scripts/wasm-image.sh WASM OUT_DIR [TAG]
#   skopeo copy oci:OUT_DIR:TAG docker://registry.example.com/sluice/sluice-filter:TAG
#
# buildah's storage lives in a temporary directory (vfs driver: no overlay
# mounts needed) and is removed at the end; the layout directory is the
# product. Timestamps are zeroed, so the same wasm gives the same digest.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 WASM OUT_DIR [TAG]" >&2
  exit 2
fi
wasm=$1
out=$2
tag=${3:-latest}
root=$(cd "$(dirname "$0")/.." && pwd)

command -v buildah >/dev/null || { echo "wasm-image: buildah is missing (apt-get install buildah)" >&2; exit 1; }
[ -f "$wasm" ] || { echo "wasm-image: $wasm is missing: run make wasm" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/context"
cp "$wasm" "$work/context/plugin.wasm"
store=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
image="localhost/sluice-filter:$tag"

buildah "${store[@]}" bud --quiet --format oci --timestamp 0 \
  -f "$root/deploy/wasm-image/Containerfile" -t "$image" "$work/context" >/dev/null
rm -rf "$out"
mkdir -p "$(dirname "$out")"
buildah "${store[@]}" push --quiet "$image" "oci:$out:$tag"

manifest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$out/index.json")
echo "wasm-image: $out (tag $tag), manifest $manifest"
echo "wasm-image: plugin.wasm sha256:$(sha256sum "$wasm" | cut -d' ' -f1)"
