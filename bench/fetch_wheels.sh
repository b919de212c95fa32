#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs offline (bench/wheels.txt) into bench/wheels/, for the GPU
# machine's Python (default 3.12) on x86-64 Linux. Run it where a package index is reachable, before copying the
# source tree to the GPU machine.
#   bench/fetch_wheels.sh [PYTHON_VERSION]      (PIP: the pip command, WHEELS_DIR: where, default bench/wheels)
set -euo pipefail
cd "$(dirname "$0")"
version="${1:-3.12}"
pip="${PIP:-python3 -m pip}"
dest="${WHEELS_DIR:-wheels}"
mkdir -p "$dest"
grep -v '^\s*#' wheels.txt | grep -v '^\s*$' > "$dest/.requirements"
# --no-deps: the list is the closure already; manylinux tags up to glibc 2.34 cover current CUDA images.
$pip download --quiet --only-binary=:all: --no-deps --python-version "$version" --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform linux_x86_64 \
    --dest "$dest" -r "$dest/.requirements"
rm -f "$dest/.requirements"
du -sh "$dest"
ls "$dest"
