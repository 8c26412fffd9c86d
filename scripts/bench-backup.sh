#!/bin/bash
# bench-backup.sh: nbdgw backup against the tools that copy from NBD today.
# Prints timings and ratios (higher ratio = nbdgw faster).
#   1. full backup of a 1 GiB fully allocated qcow2 served by nbdgw serve
#      (and by qemu-nbd): nbdgw backup vs `qemu-img convert -O qcow2` from
#      the same server vs nbdcopy to a raw file;
#   2. --layer backup of a 1 TiB sparse qcow2 with 16384 scattered 64 KiB
#      clusters (target: under 2 s), with the bytes it read.
# Every output is checked with qemu-img compare / check.
# Usage: scripts/bench-backup.sh [WORKDIR]   (needs ~5 GiB free in WORKDIR)
set -euo pipefail
. "$(dirname "$0")/env.sh"
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/bench-backup.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

for tool in qemu-img qemu-io qemu-nbd nbdcopy; do
	command -v $tool >/dev/null || { echo "bench-backup: $tool not installed" >&2; exit 1; }
done
go build -o "$work/nbdgw" "$root/cmd/nbdgw"

# start SOCK CMD...: run a server in the background, wait for SOCK.
start() {
	local sock=$1; shift
	rm -f "$sock"
	"$@" & pids+=($!)
	for _ in $(seq 100); do [ -S "$sock" ] && return; sleep 0.05; done
	echo "bench-backup: $1 did not start" >&2; exit 1
}
# best N OUT CMD...: best wall time in seconds of N runs, OUT removed first.
best() {
	local n=$1 out=$2; shift 2; local b=
	for _ in $(seq "$n"); do
		rm -f "$out"; sync
		local s=$(date +%s.%N); "$@" >/dev/null 2>&1; local e=$(date +%s.%N)
		b=$(echo "$s $e ${b:-}" | awk '{t=$2-$1; if ($3=="" || t<$3) print t; else print $3}')
	done
	echo "$b"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
uri() { echo "nbd+unix:///?socket=$1"; }

echo "== building images in $work"
big=$work/alloc1g.qcow2
. "$root/scripts/bench-images.sh"
bench_alloc1g "$big"
sparse=$work/sparse1t.qcow2
bench_sparse1t "$sparse"

start "$work/g.sock" "$work/nbdgw" serve --socket "$work/g.sock" "$big"
start "$work/q.sock" qemu-nbd -t -e 16 -r -f qcow2 -k "$work/q.sock" "$big"
start "$work/gs.sock" "$work/nbdgw" serve --socket "$work/gs.sock" "$sparse"

out=$work/out.qcow2
for srv in g q; do
	name=$([ $srv = g ] && echo "nbdgw serve" || echo "qemu-nbd -e 16")
	u=$(uri "$work/$srv.sock")
	echo "== 1: full backup of a 1 GiB allocated qcow2 from $name (best of 3)"
	b=$(best 3 "$out" "$work/nbdgw" backup "$u" "$out")
	"$work/nbdgw" backup --force "$u" "$out" 2>&1 | sed 's/^/   /'
	qemu-img compare -q "$out" "$big" && qemu-img check -q "$out" && echo "   nbdgw backup output identical and clean"
	c=$(best 3 "$out" qemu-img convert -O qcow2 "$u" "$out")
	# qemu-img convert writes with cache=unsafe (no fsync at all) and
	# nbdcopy does not sync either; nbdgw backup makes OUT durable before
	# renaming it into place. The same durability for them: sync OUT.
	cs=$(best 3 "$out" sh -c 'qemu-img convert -O qcow2 "$1" "$2" && sync "$2"' sh "$u" "$out")
	n=$(best 3 "$work/out.raw" nbdcopy "$u" "$work/out.raw")
	ns=$(best 3 "$work/out.raw" sh -c 'nbdcopy "$1" "$2" && sync "$2"' sh "$u" "$work/out.raw")
	rm -f "$out" "$work/out.raw"
	echo "   nbdgw backup ${b}s  qemu-img convert -O qcow2 ${c}s (+sync ${cs}s)  nbdcopy to a file ${n}s (+sync ${ns}s)"
	echo "   ratio convert/backup: $(ratio "$c" "$b")x (+sync $(ratio "$cs" "$b")x)   nbdcopy/backup: $(ratio "$n" "$b")x (+sync $(ratio "$ns" "$b")x)"
done

echo "== 2: --layer backup of a 1 TiB sparse qcow2, 16384 scattered 64 KiB clusters (best of 3)"
u=$(uri "$work/gs.sock")
b=$(best 3 "$out" "$work/nbdgw" backup --layer "$u" "$out")
"$work/nbdgw" backup --force --layer "$u" "$out" 2>&1 | sed 's/^/   /'
qemu-img compare -q "$out" "$sparse" && qemu-img check -q "$out" && echo "   output identical and clean"
echo "   nbdgw backup --layer ${b}s (allocated: $((16384 * 65536)) bytes; target < 2 s)"
rm -f "$out"
