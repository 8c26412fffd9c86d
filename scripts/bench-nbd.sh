#!/bin/bash
# bench-nbd.sh: NBD server benchmarks, nbdgw serve against qemu-nbd 10.0
# (the reference, from bookworm-backports), qemu-nbd 7.2 (Debian 12's own,
# unpacked by scripts/qemu72.sh) and nbdkit, all in the same run. Prints
# timings and ratios (higher ratio = nbdgw faster).
#   1. nbdcopy of a 1 GiB fully allocated qcow2 to null: nbdgw vs qemu-nbd
#      10 and 7.2, and vs nbdkit's file plugin on the raw equivalent; with
#      nbdcopy 1.14 (Debian 12) and 1.22 (scripts/build-libnbd.sh: extended
#      headers where the server grants them);
#   2. nbdinfo --map of a 1 TiB sparse qcow2 with 16384 scattered 64 KiB
#      writes: nbdgw vs qemu-nbd 10 and 7.2, with nbdinfo 1.14 (32-bit
#      block status) and 1.22 (64-bit with nbdgw and qemu-nbd 10);
#   3. nbdcopy with 4 connections vs 1 through nbdgw;
#   4. the same map by nbdgw's client and by qemu-img map (QEMU 10's NBD
#      client), each against nbdgw and qemu-nbd 10.
# Usage: scripts/bench-nbd.sh [WORKDIR]   (needs ~2.2 GiB free in WORKDIR)
set -euo pipefail
. "$(dirname "$0")/env.sh"
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/bench-nbd.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

for tool in qemu-img qemu-io qemu-nbd nbdkit nbdcopy nbdinfo; do
	command -v $tool >/dev/null || { echo "bench-nbd: $tool not installed" >&2; exit 1; }
done
go build -o "$work/nbdgw" "$root/cmd/nbdgw"
lnb=$("$root/scripts/build-libnbd.sh")/bin
q72=$("$root/scripts/qemu72.sh" 2>/dev/null) || { q72=; echo "bench-nbd: QEMU 7.2 not at hand, its columns are left out" >&2; }
echo "== peers: $(qemu-nbd --version | head -1); ${q72:+$("$q72/qemu-nbd" --version | head -1); }$(nbdkit --version); $(nbdinfo --version | head -1) and $("$lnb/nbdinfo" --version | head -1)"

# start NAME SOCK CMD...: run a server in the background, wait for SOCK.
start() {
	local sock=$2; shift 2
	rm -f "$sock"
	"$@" & pids+=($!)
	for _ in $(seq 100); do [ -S "$sock" ] && return; sleep 0.05; done
	echo "bench-nbd: server $1 did not start" >&2; exit 1
}
# best N CMD...: best wall time in seconds of N runs.
best() {
	local n=$1; shift; local b=
	for _ in $(seq "$n"); do
		local s=$(date +%s.%N); "$@" >/dev/null; local e=$(date +%s.%N)
		b=$(echo "$s $e ${b:-}" | awk '{t=$2-$1; if ($3=="" || t<$3) print t; else print $3}')
	done
	echo "$b"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
uri() { echo "nbd+unix:///?socket=$1"; }

echo "== building images in $work"
big=$work/alloc1g.qcow2 raw=$work/alloc1g.raw
. "$root/scripts/bench-images.sh"
bench_alloc1g "$big"
[ -f "$raw" ] || qemu-img convert -O raw "$big" "$raw"
sparse=$work/sparse1t.qcow2
bench_sparse1t "$sparse"

start nbdgw "$work/g.sock" "$work/nbdgw" serve --socket "$work/g.sock" "$big"
start qemu-nbd "$work/q.sock" qemu-nbd -t -e 16 -r -f qcow2 -k "$work/q.sock" "$big"
start nbdkit "$work/k.sock" nbdkit -f -r -U "$work/k.sock" file "$raw"
start nbdgw "$work/gs.sock" "$work/nbdgw" serve --socket "$work/gs.sock" "$sparse"
start qemu-nbd "$work/qs.sock" qemu-nbd -t -e 16 -r -f qcow2 -k "$work/qs.sock" "$sparse"
if [ -n "$q72" ]; then
	start qemu-nbd-7.2 "$work/q7.sock" "$q72/qemu-nbd" -t -e 16 -r -f qcow2 -k "$work/q7.sock" "$big"
	start qemu-nbd-7.2 "$work/q7s.sock" "$q72/qemu-nbd" -t -e 16 -r -f qcow2 -k "$work/q7s.sock" "$sparse"
fi

for cp in nbdcopy "$lnb/nbdcopy"; do
	echo "== 1: $("$cp" --version | head -1): 1 GiB allocated qcow2 -> null (best of 3)"
	g=$(best 3 "$cp" "$(uri "$work/g.sock")" null:)
	q=$(best 3 "$cp" "$(uri "$work/q.sock")" null:)
	k=$(best 3 "$cp" "$(uri "$work/k.sock")" null:)
	line="nbdgw ${g}s  qemu-nbd-10 ${q}s  nbdkit-file(raw) ${k}s"
	ratios="qemu-nbd-10/nbdgw: $(ratio "$q" "$g")x  nbdkit/nbdgw: $(ratio "$k" "$g")x"
	if [ -n "$q72" ]; then
		q7=$(best 3 "$cp" "$(uri "$work/q7.sock")" null:)
		line+="  qemu-nbd-7.2 ${q7}s"
		ratios+="  qemu-nbd-7.2/nbdgw: $(ratio "$q7" "$g")x"
	fi
	echo "$line"; echo "ratio $ratios"
done

for ni in nbdinfo "$lnb/nbdinfo"; do
	echo "== 2: $("$ni" --version | head -1) --map of a 1 TiB sparse qcow2, 16384 scattered 64 KiB writes (best of 3)"
	# A timing of a wrong answer means nothing: differing maps fail the run.
	cmp <("$ni" --map "$(uri "$work/gs.sock")") <("$ni" --map "$(uri "$work/qs.sock")") || { echo "bench-nbd: $ni --map of nbdgw differs from qemu-nbd's" >&2; exit 1; }
	echo "maps identical"
	g=$(best 3 "$ni" --map "$(uri "$work/gs.sock")")
	q=$(best 3 "$ni" --map "$(uri "$work/qs.sock")")
	line="nbdgw ${g}s  qemu-nbd-10 ${q}s  ratio qemu-nbd-10/nbdgw: $(ratio "$q" "$g")x"
	if [ -n "$q72" ]; then
		q7=$(best 3 "$ni" --map "$(uri "$work/q7s.sock")")
		line+="  qemu-nbd-7.2 ${q7}s  ratio qemu-nbd-7.2/nbdgw: $(ratio "$q7" "$g")x"
	fi
	echo "$line"
done

echo "== 3: nbdcopy through nbdgw, 4 connections vs 1 (best of 3)"
c1=$(best 3 nbdcopy --connections=1 "$(uri "$work/g.sock")" null:)
c4=$(best 3 nbdcopy --connections=4 "$(uri "$work/g.sock")" null:)
echo "1 conn ${c1}s  4 conns ${c4}s  speedup: $(ratio "$c1" "$c4")x"

echo "== 4: the same 1 TiB map by nbdgw's client and by qemu-img map 10 over NBD, against nbdgw and qemu-nbd 10 (best of 3)"
cmp <("$work/nbdgw" map --context base:allocation "$(uri "$work/gs.sock")") <(nbdinfo --map "$(uri "$work/gs.sock")") || { echo "bench-nbd: nbdgw map differs from nbdinfo --map" >&2; exit 1; }
echo "maps identical"
cmp <("$work/nbdgw" map --output=json "$(uri "$work/gs.sock")") <(qemu-img map --output=json "$(uri "$work/gs.sock")") || { echo "bench-nbd: nbdgw map --output=json differs from qemu-img map over NBD" >&2; exit 1; }
echo "nbdgw map --output=json = qemu-img map --output=json over NBD"
eg=$(best 3 "$work/nbdgw" map --context base:allocation "$(uri "$work/gs.sock")")
eq=$(best 3 "$work/nbdgw" map --context base:allocation "$(uri "$work/qs.sock")")
ig=$(best 3 qemu-img map --output=json "$(uri "$work/gs.sock")")
iq=$(best 3 qemu-img map --output=json "$(uri "$work/qs.sock")")
echo "nbdgw map: of nbdgw ${eg}s  of qemu-nbd-10 ${eq}s  ratio $(ratio "$eq" "$eg")x"
echo "qemu-img map: of nbdgw ${ig}s  of qemu-nbd-10 ${iq}s  ratio $(ratio "$iq" "$ig")x"
