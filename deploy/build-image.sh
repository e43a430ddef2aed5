#!/usr/bin/env bash
# Builds a statically linked flotilla (glibc with crt-static) and a FROM-scratch image
# `flotilla:dev` around it. No base image is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$target" --bin flotilla
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "target/$target/release/flotilla" "$ctx/flotilla"
cp deploy/Dockerfile "$ctx/Dockerfile"
docker build -q -t flotilla:dev "$ctx"
echo "built image flotilla:dev"
