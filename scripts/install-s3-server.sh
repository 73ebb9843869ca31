#!/usr/bin/env bash
# Installs the S3-compatible server the storage tests run (s3s-fs from crates.io: an S3 API over
# a directory) into $SFTD_CACHE/bin, outside the clone, once per pinned version. The tests find it
# there (or at $SFTD_S3_SERVER).
set -euo pipefail
version=0.14.0
cache=${SFTD_CACHE:-/var/cache/sftd}
bin=$cache/bin/s3s-fs
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qx "s3s-fs $version"; then
  exit 0
fi
cargo install --locked --root "$cache/s3s-fs-$version" "s3s-fs@$version" --features binary
mkdir -p "$cache/bin"
cp "$cache/s3s-fs-$version/bin/s3s-fs" "$bin.tmp"
mv "$bin.tmp" "$bin"
"$bin" --version
