#!/usr/bin/env bash
# Benchmark: nbdgw map --output=json vs qemu-img map --output=json on a
# 1 TiB sparse qcow2 with 16384 scattered 64 KiB writes, in one run on the
# same machine. Prints the best of N runs of each and the ratio.
# Usage: scripts/bench-map.sh [runs, default 5]
set -euo pipefail
. "$(dirname "$0")/env.sh"
runs="${1:-5}"
top=$(cd "$(dirname "$0")/.." && pwd)
work="${BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$work"
go build -o "$work/nbdgw" "$top/cmd/nbdgw"
cd "$work"

if [ ! -f big.qcow2 ]; then
	echo "building big.qcow2: 1 TiB, 16384 scattered 64 KiB writes (seeded)..."
	qemu-img create -q -f qcow2 big.qcow2 1T
	# One qemu-io process, 16384 -c commands: offsets from a fixed seed.
	mapfile -t cmds < <(awk 'BEGIN { srand(1); for (i = 0; i < 16384; i++)
		printf "-c\nwrite -P %d %.0f 64k\n", i % 250 + 1, int(rand() * 16777216) * 65536 }')
	qemu-io -f qcow2 "${cmds[@]}" big.qcow2 >/dev/null
fi

# best TIMES: the fastest of $runs runs of a command, in seconds.
best() {
	local b="" t
	for _ in $(seq "$runs"); do
		t=$( { /usr/bin/time -f %e "$@" >/dev/null; } 2>&1 | tail -n 1)
		if [ -z "$b" ] || awk -v t="$t" -v b="$b" 'BEGIN { exit !(t < b) }'; then b=$t; fi
	done
	echo "$b"
}

./nbdgw map --output=json big.qcow2 > nbdgw.json
qemu-img map --output=json big.qcow2 > qemu.json
if cmp -s nbdgw.json qemu.json; then same=identical; else same=DIFFERENT; fi
n=$(best ./nbdgw map --output=json big.qcow2)
q=$(best qemu-img map --output=json big.qcow2)
echo "extents: $(wc -l < qemu.json), outputs $same"
echo "nbdgw map:    ${n} s (best of $runs)"
echo "qemu-img map: ${q} s (best of $runs)"
awk -v n="$n" -v q="$q" 'BEGIN { if (n > 0) printf "ratio: nbdgw is %.1fx faster\n", q / n; else print "ratio: nbdgw under timer resolution" }'
[ "$same" = identical ]
