#!/usr/bin/env bash
# Unpacks Debian 12's own QEMU 7.2 tools (qemu-utils from bookworm) into a
# cache dir without installing them, so that the benchmarks can run QEMU
# 7.2 beside QEMU 10.0 (the installed reference, from bookworm-backports)
# in the same run. Nothing on the machine changes: `apt-get download`
# fetches the .deb from the machine's configured bookworm suite, dpkg -x
# unpacks it; the binaries use the libraries installed for QEMU 10.
# Usage: scripts/qemu72.sh [DIR]   (default ~/.cache/nbdgw-qemu72). Prints
# the directory holding qemu-img, qemu-io and qemu-nbd 7.2.
set -euo pipefail
dir="${1:-$HOME/.cache/nbdgw-qemu72}"
if [ -x "$dir/usr/bin/qemu-nbd" ] && "$dir/usr/bin/qemu-nbd" --version | grep -q '^qemu-nbd 7\.2'; then
	echo "$dir/usr/bin"
	exit 0
fi
version=$(apt-cache madison qemu-utils | awk '$3 ~ /^1:7\.2/ && /bookworm\/main/ {print $3; exit}')
[ -n "$version" ] || { echo "qemu72: no qemu-utils 7.2 in the apt lists (apt-get update?)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "qemu-utils=$version" >&2)
rm -rf "$dir"
mkdir -p "$dir"
dpkg -x "$tmp"/qemu-utils_*.deb "$dir"
"$dir/usr/bin/qemu-nbd" --version | head -1 >&2
echo "$dir/usr/bin"
