#!/usr/bin/env bash
# Installs everything nbdgw and its tests need on Debian 12. Safe to run
# twice: apt-get skips what is installed, the Go module cache is reused.
set -euo pipefail

packages=(
	qemu-utils       # qemu-img, qemu-io, qemu-nbd: the oracles
	libnbd-bin       # nbdinfo, nbdcopy, nbdfuse: real clients
	nbdkit           # benchmark peer and client interop
	nbd-client
	fuse3            # fusermount3 for nbdgw mount
	qemu-system-x86  # the VM test of the kernel path
	busybox-static   # the VM test's initramfs
	kmod             # depmod for the VM's modules
	cpio
	e2fsprogs        # mkfs.ext4 for filesystem tests
	fdisk            # sfdisk for partition tests
	util-linux       # losetup, mount
	procps           # pgrep/pkill in scripts
	time             # /usr/bin/time in benchmarks
	fio              # random-write benchmark (its nbd engine)
)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo=sudo
	# Refresh the package lists only when something is missing.
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Go: the machine image ships it in /usr/local/go.
export PATH="$PATH:/usr/local/go/bin"
if ! command -v go >/dev/null; then
	echo "install-deps: Go not found (expected in /usr/local/go/bin); install Go >= $(awk '/^go /{print $2}' "$(dirname "$0")/../go.mod")" >&2
	exit 1
fi
cd "$(dirname "$0")/.."
go mod download
echo "install-deps: ok ($(go version | awk '{print $3}'), ${#missing[@]} package(s) installed)"
