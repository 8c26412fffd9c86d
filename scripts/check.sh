#!/usr/bin/env bash
# The hardening suite (issue 7), longer than scripts/test.sh:
#   - every crafted corrupt image (internal/corpus) through the engine and
#     through nbdgw map/info/serve/mount, with nbdinfo, nbdcopy, cat;
#   - hostile clients (Go test, then cmd/nbdhostile at a larger scale),
#     the connection limit, the server memory budget;
#   - TLS, including the real one-minute handshake timeout of nbdgw serve;
#   - the forensic proof that nothing is ever written in read-only mode;
#   - the load test at full size without the race detector (figures);
#   - every fuzz target of the module for a longer fixed time.
# Usage: scripts/check.sh [fuzz seconds per target, default 60]
# Exit status: 0 only if every part passed; a summary is printed last.
set -uo pipefail
. "$(dirname "$0")/env.sh"
cd "$(dirname "$0")/.."
fuzztime="${1:-60}"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
declare -a summary
status=0

step() { # step NAME COMMAND...: run, keep the log, record the result
	local name=$1
	shift
	echo "== $name"
	local start=$SECONDS
	if "$@" >"$out/log" 2>&1; then
		summary+=("PASS  $name ($((SECONDS - start)) s)")
		grep -a -E '^\s+(hardening|load|forensic)_test.go:[0-9]+: (load:|server|[0-9]+ hostile|good clients|NOTE)' "$out/log" | sed 's/^ *//' || true
	else
		status=1
		summary+=("FAIL  $name ($((SECONDS - start)) s)")
		grep -a -E -- '--- FAIL|BUG|PANIC|HANG|MEMORY|EVIDENCE|panic:|^FAIL|_test.go:[0-9]+:|Failing input|testdata/fuzz|fuzzing process|go test -run' "$out/log" | head -n 40
	fi
}

step "build" go build ./...
step "corpus: engine" go test -count=1 ./internal/corpus/
step "corpus: map, info, serve, mount" go test -count=1 -timeout 20m -v -run '^TestHardeningCorpus$' ./integration/
step "memory bombs" go test -count=1 -timeout 20m -v -run '^TestHardeningMemoryBombs$' ./integration/
step "hostile clients" go test -count=1 -timeout 20m -v -run '^TestHardeningHostileClients$' ./integration/
step "connection limit" go test -count=1 -timeout 20m -v -run '^TestHardeningConnectionLimit$' ./integration/
step "block status amplification" go test -count=1 -timeout 20m -v -run '^TestHardeningBlockStatusAmplification$' ./integration/
step "server memory budget" go test -count=1 -timeout 20m -v -run '^TestHardeningServerMemoryBudget$' ./integration/
NBDGW_HARDENING_FULL=1 step "TLS (real handshake timeout)" go test -count=1 -timeout 20m -v -run '^TestHardeningTLS$' ./integration/
step "forensic read-only proof" go test -count=1 -timeout 20m -v -run '^TestForensicReadOnly$' ./integration/
NBDGW_LOAD_CLIENTS=32 NBDGW_LOAD_REQUESTS=1000 step "load 32 x 1000" go test -count=1 -timeout 20m -v -run '^TestHardeningLoad$' ./integration/

# nbdhostile against a real nbdgw serve, longer than the Go test: 8
# workers x 20 rounds of every hostile session, 4 slow readers, 4 good
# clients checking every read against qemu-img convert.
hostile_run() {
	local d="$out/hostile"
	mkdir -p "$d"
	go build -o "$d/nbdgw" ./cmd/nbdgw && go build -o "$d/nbdhostile" ./cmd/nbdhostile || return 1
	qemu-img create -q -f qcow2 "$d/base.qcow2" 64M &&
		qemu-io -f qcow2 -c "write -q -P 0x11 0 8M" -c "write -q -c -P 0x12 8M 1M" -c "write -q -z 12M 1M" "$d/base.qcow2" >/dev/null &&
		qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$d/top.qcow2" 64M &&
		qemu-img bitmap --add "$d/top.qcow2" b0 &&
		qemu-io -f qcow2 -c "write -q -P 0x21 1M 1M" -c "write -q -z 2M 512k" -c "write -q -P 0x24 63M 1M" "$d/top.qcow2" >/dev/null &&
		qemu-img convert -O raw "$d/top.qcow2" "$d/top.raw" || return 1
	"$d/nbdgw" serve --socket "$d/s" "$d/top.qcow2" 2>"$d/serve.log" &
	local pid=$!
	for _ in $(seq 100); do [ -S "$d/s" ] && break; sleep 0.05; done
	"$d/nbdhostile" -rounds 20 -parallel 8 -slow 4 -good 4 -verify "$d/top.raw" \
		-contexts base:allocation,qemu:allocation-depth,qemu:joint-allocation,qemu:dirty-bitmap:b0 \
		"nbd+unix:///?socket=$d/s"
	local rc=$?
	kill -TERM "$pid"
	wait "$pid" || rc=1
	if grep -a -q -E 'panic:|goroutine ' "$d/serve.log"; then
		echo "PANIC in nbdgw serve"
		rc=1
	fi
	return $rc
}
step "nbdhostile vs nbdgw serve" hostile_run
grep -a 'hostile sessions' "$out/log" || true

for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
		step "fuzz ${pkg#github.com/nbdgw/nbdgw/} $target ${fuzztime}s" \
			scripts/fuzz-one.sh "$pkg" "$target" "$fuzztime"
	done
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
