#!/usr/bin/env bash
# Builds the example server's image and prints its reference as the last
# line of output.
#
#   scripts/build-image.sh [--local] [--model-dir DIR] [--tag REF]
#
# With docker (and a running daemon) or podman, it builds the Containerfile
# (which pulls the digest-pinned builder). Without either, or with --local,
# it needs no registry: buildah (storage driver vfs, no daemon) assembles
# the same runtime filesystem FROM scratch around the release binary built
# here (cargo build --release --example serve) and the shared libraries it
# links. --model-dir bakes a Hugging Face model directory in at
# /models/NAME (NAME: the directory's name) and makes it the default.
set -euo pipefail
cd "$(dirname "$0")/.."

local_build=false model_dir="" tag=""
while [ $# -gt 0 ]; do
  case $1 in
    --local) local_build=true ;;
    --model-dir) model_dir=${2:?--model-dir needs a directory}; shift ;;
    --tag) tag=${2:?--tag needs a reference}; shift ;;
    *) echo "usage: $0 [--local] [--model-dir DIR] [--tag REF]" >&2; exit 2 ;;
  esac
  shift
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
model_name=${model_dir:+$(basename "$(realpath "$model_dir")")}
ref=${tag:-localhost/candlewick-serve:$version${model_name:+-$model_name}}
base=localhost/candlewick-serve:$version

tool=buildah-local
if ! $local_build; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    tool=docker
  elif command -v podman >/dev/null; then
    tool=podman
  fi
fi
echo "building $ref with $tool" >&2

case $tool in
  docker | podman)
    "$tool" build -f Containerfile -t "$base" .
    if [ -n "$model_dir" ]; then
      printf 'FROM %s\nCOPY --chown=0:0 . /models/%s\nENV CANDLEWICK_MODEL_DIR=/models/%s\n' \
        "$base" "$model_name" "$model_name" | "$tool" build -f - -t "$ref" "$model_dir"
    elif [ "$ref" != "$base" ]; then
      "$tool" tag "$base" "$ref"
    fi
    ;;
  buildah-local)
    command -v buildah >/dev/null || { echo "needs docker, podman or buildah" >&2; exit 1; }
    bah() { buildah --storage-driver vfs "$@"; }
    cargo build --release --example serve >&2
    binary=${CARGO_TARGET_DIR:-target}/release/examples/serve
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    scripts/image-rootfs.sh "$binary" "$rootfs"
    if [ -n "$model_dir" ]; then
      cp -rL "$model_dir" "$rootfs/models/$model_name"
    fi
    container=$(bah from scratch)
    bah copy "$container" "$rootfs" / >/dev/null
    bah config --user 65532:65532 --port 8080 --port 8081 \
      --entrypoint '["/usr/local/bin/candlewick-serve", "--bind", "0.0.0.0"]' \
      ${model_dir:+--env CANDLEWICK_MODEL_DIR=/models/$model_name} "$container"
    bah commit --rm --quiet "$container" "$ref" >/dev/null
    ;;
esac
echo "$ref"
