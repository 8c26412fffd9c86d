#!/usr/bin/env bash
# Writes the crafted corrupt-image corpus (package internal/corpus: bad
# magic, huge sizes, tables past EOF or unaligned, overlapping metadata,
# compressed lengths out of range, backing loops, chains deeper than the
# limit, bitmap directories and tables out of range, reserved bits,
# truncated files) into DIR, one subdirectory per case, and lists
# "NAME STAGE IMAGE" per line. The tests build the same corpus in a
# temporary directory; this is for trying the cases by hand:
#   scripts/make-corrupt-corpus.sh /tmp/corpus
#   while read name stage image; do nbdgw map "$image"; done < /tmp/corpus/cases.txt
# Needs qemu-img and qemu-io.
set -euo pipefail
. "$(dirname "$0")/env.sh"
if [ $# -ne 1 ]; then
	echo "usage: $0 DIR" >&2
	exit 2
fi
cd "$(dirname "$0")/.."
mkdir -p "$1"
go run ./internal/corpus/mkcorpus "$1" | tee "$1/cases.txt"
