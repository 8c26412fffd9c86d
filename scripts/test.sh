#!/usr/bin/env bash
# The test suite: formatting, vet, staticcheck, every Go test with the race
# detector (unit tests, tests against QEMU's tools, FUSE mounts, the kernel
# path in a VM), then each fuzz target for a short fixed time.
# Usage: scripts/test.sh [fuzz seconds per target, default 10]
set -euo pipefail
export PATH="$PATH:/usr/local/go/bin:$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin"
cd "$(dirname "$0")/.."
fuzztime="${1:-10}s"

echo "== gofmt"
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then
	echo "gofmt would change:"; echo "$unformatted"; exit 1
fi

echo "== go vet"
go vet ./...

echo "== staticcheck"
if ! command -v staticcheck >/dev/null; then
	GOFLAGS= go install honnef.co/go/tools/cmd/staticcheck@2026.2.2
fi
staticcheck ./...

echo "== go test -race"
go test -race -count=1 -timeout 40m ./...

echo "== fuzz (${fuzztime} per target)"
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
		echo "-- $pkg $target"
		# The whole output on failure (the crash and the input it saved).
		if ! out=$(go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg" 2>&1); then
			echo "$out"
			exit 1
		fi
		echo "$out" | tail -n 3
	done
done
echo "== all tests passed"
