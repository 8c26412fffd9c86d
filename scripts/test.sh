#!/usr/bin/env bash
# The test suite: formatting, vet, staticcheck, every Go test with the race
# detector (unit tests, tests against QEMU's tools, FUSE mounts, the kernel
# path in a VM), then each fuzz target for a short fixed time. A skipped
# test is a failure (see "go test -race" below).
# Usage: scripts/test.sh [fuzz seconds per target, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
fuzztime="${1:-10}"

echo "== gofmt"
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then
	echo "gofmt would change:"; echo "$unformatted"; exit 1
fi

echo "== go vet"
go vet ./...

echo "== go mod tidy -diff"
go mod tidy -diff

echo "== staticcheck"
# go run at a pinned version the module proxy serves: nothing installed by
# hand, nothing looked up on PATH.
go run "$STATICCHECK" ./...

echo "== go test -race"
# A skipped test on the CI machine is a failure. scripts/install-deps.sh
# installs every tool the tests use, /dev/fuse, loop devices and root are
# there, and the VM test and the FUSE tests must run: a t.Skip here means a
# part of the suite silently did not run. internal/skipcheck reads the
# results as JSON, prints what go test prints, and fails on any skip but the
# few it lists whose reason is the machine itself (the tests of attach on a
# kernel without nbd, when the kernel has nbd: the VM test covers it).
skipcheck="$(mktemp -d)/skipcheck"
go build -o "$skipcheck" ./internal/skipcheck
go test -race -count=1 -timeout 40m -json ./... | "$skipcheck"

echo "== fuzz (${fuzztime} s per target)"
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
		echo "-- $pkg $target"
		# The whole output on failure (the crash and the input it saved).
		scripts/fuzz-one.sh "$pkg" "$target" "$fuzztime" || exit 1
	done
done
echo "== all tests passed"
