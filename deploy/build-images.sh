#!/usr/bin/env bash
# Builds every Flotilla image on this machine, from nothing (no registry, nothing pulled):
#   flotilla:dev              FROM scratch around the statically linked binary
#   flotilla-debian:bookworm  a minimal Debian with python3, from Debian's packages (mmdebstrap)
#   flotilla-node:dev         the node image on it: the binary and a Python virtualenv
# Prints each image's size and how long its build took.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mmdebstrap >/dev/null || {
  apt-get update -qq && apt-get install -y -qq mmdebstrap
}
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
elapsed() { echo $(( $(date +%s) - $1 )); }

t=$(date +%s)
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" --bin flotilla
echo "binary: $(elapsed "$t") s"

t=$(date +%s)
mkdir -p "$ctx/hub/data"
cp "target/$target/release/flotilla" "$ctx/hub/flotilla"
docker build -q -t flotilla:dev -f deploy/images/hub.Dockerfile "$ctx/hub" >/dev/null
echo "flotilla:dev: $(elapsed "$t") s"

t=$(date +%s)
if ! docker image inspect flotilla-debian:bookworm >/dev/null 2>&1 || [ "${REBUILD_BASE:-0}" = 1 ]; then
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$ctx/base.tar" http://deb.debian.org/debian
  docker import "$ctx/base.tar" flotilla-debian:bookworm >/dev/null
fi
echo "flotilla-debian:bookworm: $(elapsed "$t") s"

t=$(date +%s)
mkdir -p "$ctx/node"
cp "target/$target/release/flotilla" "$ctx/node/flotilla"
docker build -q -t flotilla-node:dev -f deploy/images/node.Dockerfile "$ctx/node" >/dev/null
echo "flotilla-node:dev: $(elapsed "$t") s"

docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' |
  grep -E '^(flotilla|flotilla-debian|flotilla-node):' | sort
