#!/bin/bash
# bench-nbd-write.sh: NBD write benchmarks, `nbdgw serve --writable` against
# `qemu-nbd -f qcow2 --cache=writeback` (its default aio=threads), each on
# its own copy of a fresh 1 GiB qcow2 with 64 KiB clusters, in one run.
# Prints rates and ratios (ratio > 1: nbdgw faster).
#   1. fio (ioengine=nbd) random 4 KiB writes, queue depth 16, 20000 writes
#      with the same seed on both: first on the fresh image (cluster
#      allocation), then again (overwrites of allocated clusters);
#      each job ends with a flush (end_fsync);
#   2. sequential 1 MiB writes: nbdcopy --flush of a 1 GiB random raw file
#      into the export, with 1 connection, then with 4 to each server
#      (qemu-nbd -e 16 offers multi-conn on writable exports too: nbdinfo
#      shows can_multi_conn: true; the script checks it for both);
#   3. read-back cost of no sendfile on writable exports: nbdcopy of the
#      written image to null through nbdgw --writable vs read-only (and
#      qemu-nbd -r for scale).
# Afterwards qemu-img check must pass on both images and qemu-img compare
# must find the nbdcopy results identical to the source.
# Usage: scripts/bench-nbd-write.sh [WORKDIR]   (needs ~4 GiB free)
set -euo pipefail
shopt -s inherit_errexit
. "$(dirname "$0")/env.sh"
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/bench-nbd-write.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

for tool in qemu-img qemu-io qemu-nbd nbdcopy nbdinfo fio python3; do
	command -v $tool >/dev/null || { echo "bench-nbd-write: $tool not installed (fio: apt-get install fio)" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "bench-nbd-write: fio lacks the nbd engine" >&2; exit 1; }
go build -o "$work/nbdgw" "$root/cmd/nbdgw"

uri() { echo "nbd+unix:///?socket=$1"; }
# start SOCK CMD...: run a server in the background and wait for SOCK.
start() {
	local sock=$1; shift
	rm -f "$sock"
	"$@" & pids+=($!)
	for _ in $(seq 200); do [ -S "$sock" ] && return; sleep 0.05; done
	echo "bench-nbd-write: $1 did not start" >&2; exit 1
}
# stop: SIGTERM to the last started server and wait (nbdgw flushes and closes).
stop() {
	local p=${pids[-1]}
	kill -TERM "$p"; wait "$p" || true
	unset 'pids[-1]'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
secs() { local s=$(date +%s.%N); "$@" >/dev/null; local e=$(date +%s.%N); awk -v s="$s" -v e="$e" 'BEGIN{printf "%.3f", e-s}'; }

check() { qemu-img check -q "$1" || { echo "bench-nbd-write: qemu-img check $1 failed" >&2; exit 1; }; }
same() { qemu-img compare -q "$src" "$1" || { echo "bench-nbd-write: $1 differs from $src" >&2; exit 1; }; }
fresh() { rm -f "$1"; qemu-img create -q -f qcow2 -o cluster_size=64k "$1" 1G; }
gnbd() { start "$work/g.sock" "$work/nbdgw" serve --writable --socket "$work/g.sock" "$1"; }
qnbd() { start "$work/q.sock" qemu-nbd -t -e 16 -f qcow2 --cache=writeback -k "$work/q.sock" "$1"; }

# fiorand URI: IOPS of 20000 random 4 KiB writes at queue depth 16.
fiorand() {
	fio --name=randwrite --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=16 \
		--number_ios=20000 --size=1G --randrepeat=1 --randseed=42 --end_fsync=1 \
		--output-format=json --output="$work/fio.json" >/dev/null
	python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print("%.0f" % (j["write"]["total_ios"] / (j["job_runtime"] / 1000.0)))' "$work/fio.json"
}

echo "== images in $work"
src=$work/src1g.raw
[ -f "$src" ] || head -c 1G /dev/urandom >"$src"
gimg=$work/g.qcow2 qimg=$work/q.qcow2
fresh "$gimg"; fresh "$qimg"

echo "== 1: fio random 4 KiB writes, QD16, 20000 writes + final flush (IOPS, best of 3 fresh images)"
max() { awk -v a="$1" -v b="${2:-0}" 'BEGIN{print (a > b) ? a : b}'; }
g1= g2= q1= q2=
for _ in 1 2 3; do
	fresh "$gimg"; fresh "$qimg"
	gnbd "$gimg"; g1=$(max "$(fiorand "$(uri "$work/g.sock")")" "$g1"); g2=$(max "$(fiorand "$(uri "$work/g.sock")")" "$g2"); stop
	qnbd "$qimg"; q1=$(max "$(fiorand "$(uri "$work/q.sock")")" "$q1"); q2=$(max "$(fiorand "$(uri "$work/q.sock")")" "$q2"); stop
	check "$gimg"; check "$qimg"
done
echo "fresh image:     nbdgw $g1 IOPS  qemu-nbd $q1 IOPS  ratio nbdgw/qemu-nbd $(ratio "$g1" "$q1")x"
echo "allocated image: nbdgw $g2 IOPS  qemu-nbd $q2 IOPS  ratio nbdgw/qemu-nbd $(ratio "$g2" "$q2")x"
echo "qemu-img check: both clean after every run"

echo "== 2: nbdcopy --flush of a 1 GiB random raw file, 1 MiB requests (seconds)"
fresh "$gimg"; fresh "$qimg"
gnbd "$gimg"; g=$(secs nbdcopy --flush --connections=1 --request-size=1048576 "$src" "$(uri "$work/g.sock")"); stop
qnbd "$qimg"; q=$(secs nbdcopy --flush --connections=1 --request-size=1048576 "$src" "$(uri "$work/q.sock")"); stop
echo "1 connection:  nbdgw ${g}s  qemu-nbd ${q}s  ratio qemu-nbd/nbdgw $(ratio "$q" "$g")x  ($(awk -v t="$g" 'BEGIN{printf "%.0f", 1024/t}') vs $(awk -v t="$q" 'BEGIN{printf "%.0f", 1024/t}') MiB/s)"
same "$gimg"; same "$qimg"; echo "qemu-img compare: both equal the source"
check "$gimg"; check "$qimg"; echo "qemu-img check: both clean"
# multiconn URI: fail unless the server offers multi-conn (else nbdcopy
# would quietly fall back to 1 connection and the comparison would lie).
multiconn() { nbdinfo "$1" | grep -q 'can_multi_conn: true' || { echo "bench-nbd-write: $1 offers no multi-conn" >&2; exit 1; }; }
fresh "$gimg"; fresh "$qimg"
gnbd "$gimg"; multiconn "$(uri "$work/g.sock")"; g4=$(secs nbdcopy --flush --connections=4 --request-size=1048576 "$src" "$(uri "$work/g.sock")"); stop
qnbd "$qimg"; multiconn "$(uri "$work/q.sock")"; q4=$(secs nbdcopy --flush --connections=4 --request-size=1048576 "$src" "$(uri "$work/q.sock")"); stop
echo "4 connections: nbdgw ${g4}s  qemu-nbd ${q4}s  ratio qemu-nbd/nbdgw $(ratio "$q4" "$g4")x  (nbdgw vs its 1 connection: $(ratio "$g" "$g4")x; qemu-nbd vs its 1: $(ratio "$q" "$q4")x)"
same "$gimg"; same "$qimg"; check "$gimg"; check "$qimg"; echo "qemu-img compare + check: both ok"

echo "== 3: reading back through nbdgw, writable (no sendfile) vs read-only (sendfile), best of 3"
best() { local b=; for _ in 1 2 3; do local t=$(secs "$@"); b=$(awk -v t="$t" -v b="${b:-}" 'BEGIN{print (b=="" || t<b) ? t : b}'); done; echo "$b"; }
gnbd "$gimg"; w=$(best nbdcopy --connections=1 "$(uri "$work/g.sock")" null:); stop
start "$work/g.sock" "$work/nbdgw" serve --socket "$work/g.sock" "$gimg"; r=$(best nbdcopy --connections=1 "$(uri "$work/g.sock")" null:); stop
start "$work/q.sock" qemu-nbd -t -e 16 -r -f qcow2 -k "$work/q.sock" "$gimg"; q=$(best nbdcopy --connections=1 "$(uri "$work/q.sock")" null:); stop
echo "writable ${w}s  read-only ${r}s  writable/read-only time $(ratio "$w" "$r")x  (qemu-nbd -r ${q}s: ratio qemu-nbd/nbdgw-writable $(ratio "$q" "$w")x)"
