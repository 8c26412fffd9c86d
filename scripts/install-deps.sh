#!/usr/bin/env bash
# Installs everything nbdgw and its tests need on Debian 12, Go included.
# Safe to run twice: apt-get skips what is installed, the Go module cache is
# reused. The only change to the machine's package sources is the
# bookworm-backports suite, for QEMU 10.0 (the reference) and, where the
# machine has no Go, golang-1.23-go (libnbd's trixie source package is
# fetched through a private apt configuration, see build-libnbd.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

packages=(
	libnbd-bin       # nbdinfo, nbdcopy, nbdfuse: real clients
	nbdkit           # benchmark peer and client interop
	nbd-client
	fuse3            # fusermount3 for nbdgw mount
	busybox-static   # the VM test's initramfs
	kmod             # depmod for the VM's modules
	cpio
	e2fsprogs        # mkfs.ext4 for filesystem tests
	fdisk            # sfdisk for partition tests
	util-linux       # losetup, mount
	python3          # an OpenSSL TLS client (its ssl module) in the TLS tests
	openssl          # certificates in the TLS tests and the VM test
	gnutls-bin       # certtool (certificates as QEMU's docs make them), gnutls-cli, psktool (TLS-PSK keys)
	libgnutls28-dev  # serve --tls-psk: GnuTLS through cgo (internal/gnutlspsk)
	pkg-config       # cgo's #cgo pkg-config: gnutls
	gcc              # cgo
	procps           # pgrep/pkill in scripts
	time             # /usr/bin/time in benchmarks
	fio              # random-write benchmark (its nbd engine)
)
# From bookworm-backports: QEMU 10.0, the reference (qemu-img, qemu-io,
# qemu-nbd are the oracles; qemu-system-x86 runs the kernel-path VM).
backports=(qemu-utils qemu-system-x86)
[ -x /usr/local/go/bin/go ] || backports+=(golang-1.23-go)

installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed'; }
from_backports() { dpkg-query -W -f='${Version}\n' "$1" 2>/dev/null | grep -q 'bpo12'; }

missing=() missing_bpo=()
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
for p in "${backports[@]}"; do from_backports "$p" || missing_bpo+=("$p"); done
apt_install() { DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
if ((${#missing[@]} + ${#missing_bpo[@]})); then
	if ! grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
		echo "deb http://deb.debian.org/debian bookworm-backports main" | $sudo tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
	fi
	$sudo apt-get update -qq
	((${#missing[@]} == 0)) || apt_install "${missing[@]}"
	# -t: QEMU 10's own dependencies (qemu-system-common, seabios, ...)
	# come from the same suite.
	((${#missing_bpo[@]} == 0)) || apt_install -t bookworm-backports "${missing_bpo[@]}"
fi

. scripts/env.sh
if ! command -v go >/dev/null; then
	echo "install-deps: Go not found after installing golang-1.23-go" >&2
	exit 1
fi
go mod download
go run "$STATICCHECK" -version >/dev/null
# libnbd >= 1.18 for the tests of 64-bit block status and block status
# filters: built from trixie's source package into ~/.cache/nbdgw-libnbd
# (once, ~3 min; its build dependencies are installed by the script).
libnbd=$(scripts/build-libnbd.sh)
echo "install-deps: ok ($(go version | awk '{print $3}'), $(qemu-img --version | head -1), $("$libnbd/bin/nbdinfo" --version | tail -1) in $libnbd, $((${#missing[@]} + ${#missing_bpo[@]})) package(s) installed)"
