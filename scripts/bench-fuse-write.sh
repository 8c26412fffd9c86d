#!/bin/bash
# bench-fuse-write.sh: writes through `nbdgw mount --writable` versus
# nbdfuse over qemu-nbd on the same kind of image (a fresh qcow2):
#   - sequential: dd bs=1M conv=notrunc,fsync of SIZE_MIB MiB of random
#     data, first onto unallocated clusters, then overwriting them;
#   - random: 4 KiB pwrites at random 4 KiB-aligned offsets (RANDOM_OPS of
#     them, seeded) over the first SIZE_MIB MiB, then one fsync.
# Prints MiB/s (best of $RUNS) and the nbdgw/nbdfuse ratio. Every image is
# checked with `qemu-img check` afterwards.
#
# usage: scripts/bench-fuse-write.sh [SIZE_MIB]   (default 256; RUNS=3, RANDOM_OPS=20000)
set -euo pipefail

SIZE_MIB=${1:-256}
RUNS=${RUNS:-3}
RANDOM_OPS=${RANDOM_OPS:-20000}
for tool in qemu-img qemu-nbd nbdfuse fusermount3 go python3 bc; do
	command -v "$tool" >/dev/null || { echo "bench-fuse-write: $tool not installed" >&2; exit 1; }
done

repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/bench-fuse-write.XXXXXX)
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
head -c $((SIZE_MIB << 20)) /dev/urandom >"$work/src"
cat "$work/src" >/dev/null

now() { date +%s.%N; }
wait_file() {
	for _ in $(seq 200); do [ -e "$1" ] && return 0; sleep 0.05; done
	echo "bench-fuse-write: $1 did not appear" >&2
	exit 1
}
best() { printf '%s\n' "$@" | sort -g | head -1; }
# seq_write TARGET: seconds for dd of src onto TARGET, fsync included
seq_write() {
	local t0 t1
	t0=$(now)
	dd if="$work/src" of="$1" bs=1M conv=notrunc,fsync status=none
	t1=$(now)
	echo "$t1 - $t0" | bc -l
}
# rand_write TARGET: seconds for RANDOM_OPS 4 KiB pwrites and an fsync
rand_write() {
	python3 - "$1" "$SIZE_MIB" "$RANDOM_OPS" <<'PY'
import os, random, sys, time
path, size, ops = sys.argv[1], int(sys.argv[2]) << 20, int(sys.argv[3])
rng = random.Random(42)
buf = os.urandom(4096)
fd = os.open(path, os.O_WRONLY)
t0 = time.monotonic()
for _ in range(ops):
    os.pwrite(fd, buf, rng.randrange(size // 4096) * 4096)
os.fsync(fd)
print(time.monotonic() - t0)
os.close(fd)
PY
}
check() { qemu-img check -q "$1" || { echo "bench-fuse-write: qemu-img check $1 failed" >&2; exit 1; }; }

declare -A times
for run in $(seq "$RUNS"); do
	img=$work/g$run.qcow2
	qemu-img create -q -f qcow2 "$img" $((SIZE_MIB * 2))M
	"$work/nbdgw" mount --writable "$img" "$mnt" &
	nbdgw_pid=$!
	wait_file "$mnt/disk"
	times[nbdgw_seq_new]+="$(seq_write "$mnt/disk") "
	times[nbdgw_seq_over]+="$(seq_write "$mnt/disk") "
	kill -INT "$nbdgw_pid"
	wait "$nbdgw_pid"
	nbdgw_pid=
	check "$img"
	qemu-img create -q -f qcow2 "$img" $((SIZE_MIB * 2))M
	"$work/nbdgw" mount --writable "$img" "$mnt" &
	nbdgw_pid=$!
	wait_file "$mnt/disk"
	times[nbdgw_rand]+="$(rand_write "$mnt/disk") "
	kill -INT "$nbdgw_pid"
	wait "$nbdgw_pid"
	nbdgw_pid=
	check "$img"

	img=$work/q$run.qcow2
	qemu-img create -q -f qcow2 "$img" $((SIZE_MIB * 2))M
	nbdfuse "$mnt/nbd" [ qemu-nbd -f qcow2 "$img" ] &
	wait_file "$mnt/nbd"
	times[nbdfuse_seq_new]+="$(seq_write "$mnt/nbd") "
	times[nbdfuse_seq_over]+="$(seq_write "$mnt/nbd") "
	fusermount3 -u "$mnt"
	wait
	check "$img"
	qemu-img create -q -f qcow2 "$img" $((SIZE_MIB * 2))M
	nbdfuse "$mnt/nbd" [ qemu-nbd -f qcow2 "$img" ] &
	wait_file "$mnt/nbd"
	times[nbdfuse_rand]+="$(rand_write "$mnt/nbd") "
	fusermount3 -u "$mnt"
	wait
	check "$img"
done

printf 'fresh %d MiB qcow2 (64 KiB clusters), best of %d\n' "$((SIZE_MIB * 2))" "$RUNS"
for kind in seq_new seq_over rand; do
	# shellcheck disable=SC2086
	g=$(best ${times[nbdgw_$kind]})
	# shellcheck disable=SC2086
	n=$(best ${times[nbdfuse_$kind]})
	case $kind in
	seq_new) what="dd bs=1M ${SIZE_MIB} MiB, unallocated" bytes=$((SIZE_MIB << 20)) ;;
	seq_over) what="dd bs=1M ${SIZE_MIB} MiB, overwrite" bytes=$((SIZE_MIB << 20)) ;;
	rand) what="random 4 KiB x ${RANDOM_OPS}" bytes=$((RANDOM_OPS * 4096)) ;;
	esac
	printf '%-34s nbdgw %7.1f MiB/s   nbdfuse+qemu-nbd %7.1f MiB/s   ratio %.2f\n' "$what" \
		"$(echo "$bytes / 1048576 / $g" | bc -l)" "$(echo "$bytes / 1048576 / $n" | bc -l)" "$(echo "$n / $g" | bc -l)"
done
