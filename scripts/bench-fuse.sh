#!/bin/bash
# bench-fuse.sh: `cat disk > /dev/null` of a 1 GiB fully allocated qcow2
# through `nbdgw mount`, versus nbdfuse over qemu-nbd on the same image,
# versus reading the raw equivalent from the page cache. Prints seconds
# (best of $RUNS) and ratios. The qcow2 file is in the host page cache for
# every run; each FUSE run uses a fresh mount so that nothing is served
# from the FUSE file's own page cache.
#
# usage: scripts/bench-fuse.sh [SIZE_MIB]   (default 1024; RUNS=3)
set -euo pipefail

SIZE_MIB=${1:-1024}
RUNS=${RUNS:-3}
for tool in qemu-img qemu-nbd nbdfuse fusermount3 go; do
	command -v "$tool" >/dev/null || { echo "bench-fuse: $tool not installed" >&2; exit 1; }
done

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/bench-fuse.XXXXXX)
mnt=$work/mnt
mkdir "$mnt"
nbdgw_pid=
cleanup() {
	mountpoint -q "$mnt" && fusermount3 -u -z "$mnt" || true
	[ -n "$nbdgw_pid" ] && kill "$nbdgw_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

(cd "$repo" && go build -o "$work/nbdgw" ./cmd/nbdgw)

echo "bench-fuse: building a ${SIZE_MIB} MiB allocated qcow2 ..." >&2
# Incompressible, non-zero data: every cluster allocated.
head -c $((SIZE_MIB << 20)) /dev/urandom >"$work/disk.raw"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/disk.qcow2"
cat "$work/disk.qcow2" "$work/disk.raw" >/dev/null # into the page cache

now() { date +%s.%N; }
# timed_cat FILE: seconds to cat FILE to /dev/null
timed_cat() {
	local t0 t1
	t0=$(now)
	cat "$1" >/dev/null
	t1=$(now)
	echo "$t1 - $t0" | bc -l
}
wait_file() {
	for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done
	echo "bench-fuse: $1 did not appear" >&2
	exit 1
}
best() { printf '%s\n' "$@" | sort -g | head -1; }

nbdgw_times=() nbdgw_warm=() nbdfuse_times=() raw_times=()
for _ in $(seq "$RUNS"); do
	"$work/nbdgw" mount "$work/disk.qcow2" "$mnt" &
	nbdgw_pid=$!
	wait_file "$mnt/disk"
	nbdgw_times+=("$(timed_cat "$mnt/disk")")
	nbdgw_warm+=("$(timed_cat "$mnt/disk")") # keep-cache: page cache of the FUSE file
	kill -INT "$nbdgw_pid"
	wait "$nbdgw_pid"
	nbdgw_pid=

	nbdfuse -r -C 4 "$mnt/nbd" [ qemu-nbd -r -f qcow2 --shared=8 "$work/disk.qcow2" ] &
	wait_file "$mnt/nbd"
	nbdfuse_times+=("$(timed_cat "$mnt/nbd")")
	fusermount3 -u "$mnt"
	wait

	raw_times+=("$(timed_cat "$work/disk.raw")")
done

g=$(best "${nbdgw_times[@]}")
w=$(best "${nbdgw_warm[@]}")
n=$(best "${nbdfuse_times[@]}")
r=$(best "${raw_times[@]}")
mib() { echo "$SIZE_MIB / $1" | bc -l; }
printf 'image: %d MiB allocated qcow2 (host file in page cache), best of %d\n' "$SIZE_MIB" "$RUNS"
printf '%-42s %7.3f s  %7.0f MiB/s\n' "nbdgw mount, cat disk (cold FUSE cache)" "$g" "$(mib "$g")"
printf '%-42s %7.3f s  %7.0f MiB/s\n' "nbdgw mount, cat disk again (keep-cache)" "$w" "$(mib "$w")"
printf '%-42s %7.3f s  %7.0f MiB/s\n' "nbdfuse over qemu-nbd, cat nbd" "$n" "$(mib "$n")"
printf '%-42s %7.3f s  %7.0f MiB/s\n' "raw file from the page cache" "$r" "$(mib "$r")"
printf 'ratio nbdfuse/nbdgw (speed-up of nbdgw): %.2fx\n' "$(echo "$n / $g" | bc -l)"
printf 'ratio nbdgw/raw page cache (slow-down):  %.2fx\n' "$(echo "$g / $r" | bc -l)"
