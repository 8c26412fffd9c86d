#!/usr/bin/env bash
# Benchmark: nbdgw map --output=json vs qemu-img map --output=json on a
# 1 TiB sparse qcow2 with 16384 scattered 64 KiB writes, in one run on the
# same machine: of the file, by qemu-img 10.0 (the reference) and 7.2
# (Debian 12's, unpacked by scripts/qemu72.sh, where at hand); and over
# NBD, nbdgw's client and qemu-img 10's against nbdgw serve and qemu-nbd
# 10 (both negotiate extended headers). Prints the best of N runs of each
# and the ratios; fails if an output differs from QEMU 10's.
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

q72=$("$top/scripts/qemu72.sh" 2>/dev/null) || { q72=; echo "bench-map: QEMU 7.2 not at hand, its figures are left out" >&2; }
fail=0
same() { if cmp -s "$1" "$2"; then echo identical; else echo DIFFERENT; fail=1; fi; }
./nbdgw map --output=json big.qcow2 > nbdgw.json
qemu-img map --output=json big.qcow2 > qemu.json
echo "extents: $(wc -l < qemu.json), nbdgw's output and qemu-img 10's $(same nbdgw.json qemu.json)"
n=$(best ./nbdgw map --output=json big.qcow2)
q=$(best qemu-img map --output=json big.qcow2)
echo "== the file ($(qemu-img --version | head -1))"
echo "nbdgw map:    ${n} s (best of $runs)"
echo "qemu-img map: ${q} s (best of $runs)"
awk -v n="$n" -v q="$q" 'BEGIN { if (n > 0) printf "ratio: nbdgw is %.1fx faster\n", q / n; else print "ratio: nbdgw under timer resolution" }'
if [ -n "$q72" ]; then
	q7=$(best "$q72/qemu-img" map --output=json big.qcow2)
	echo "qemu-img 7.2 map: ${q7} s (best of $runs; no \"compressed\" field)"
	awk -v n="$n" -v q="$q7" 'BEGIN { if (n > 0) printf "ratio: nbdgw is %.1fx faster than 7.2\n", q / n }'
fi

echo "== over NBD (nbd+unix://)"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
rm -f g.sock q.sock
./nbdgw serve --socket "$work/g.sock" big.qcow2 & pids+=($!)
qemu-nbd -t -r -f qcow2 -k "$work/q.sock" big.qcow2 & pids+=($!)
for _ in $(seq 100); do [ -S g.sock ] && [ -S q.sock ] && break; sleep 0.05; done
for srv in g q; do
	u="nbd+unix:///?socket=$work/$srv.sock"
	./nbdgw map --output=json "$u" > "nbdgw-$srv.json"
	qemu-img map --output=json "$u" > "qemu-$srv.json"
done
name() { [ "$1" = g ] && echo "nbdgw serve" || echo "qemu-nbd 10"; }
echo "nbdgw map and qemu-img map of nbdgw serve: $(same nbdgw-g.json qemu-g.json); of qemu-nbd 10: $(same nbdgw-q.json qemu-q.json)"
sed "s|$work/q.sock|$work/g.sock|" qemu-q.json > qemu-q2g.json
echo "qemu-img map of nbdgw serve and of qemu-nbd 10: $(same qemu-g.json qemu-q2g.json)"
declare -A t
for srv in g q; do
	u="nbd+unix:///?socket=$work/$srv.sock"
	t[n$srv]=$(best ./nbdgw map --output=json "$u")
	t[q$srv]=$(best qemu-img map --output=json "$u")
	echo "of $(name $srv): nbdgw map ${t[n$srv]} s, qemu-img map ${t[q$srv]} s (best of $runs)"
done
awk -v ng="${t[ng]}" -v qg="${t[qg]}" -v nq="${t[nq]}" -v qq="${t[qq]}" 'BEGIN {
	printf "ratio, server qemu-nbd 10 / nbdgw serve: with nbdgw map %.1fx, with qemu-img map %.1fx\n", nq / ng, qq / qg
	printf "ratio, client qemu-img map / nbdgw map: of nbdgw serve %.1fx, of qemu-nbd 10 %.1fx\n", qg / ng, qq / nq }'
[ "$fail" = 0 ]
