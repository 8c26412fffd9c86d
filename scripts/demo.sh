#!/usr/bin/env bash
# The main job on an example it builds itself: a raw base and a qcow2
# overlay (the seed 000 example of qemu:joint-allocation), then what nbdgw
# reports for it, next to what QEMU reports.
set -euo pipefail
. "$(dirname "$0")/env.sh"
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The binary stays in the checkout (./nbdgw, ignored by git) for what
# comes next; the example images go with the temporary directory.
(cd "$top" && go build -buildvcs=true -o "$top/nbdgw" ./cmd/nbdgw)
cd "$work"
ln -s "$top/nbdgw" nbdgw

qemu-img create -q base.raw $((4 * 64 * 1024))
qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2
qemu-io -f raw -c "w -P 65 0 64k" -c "w -P 66 64k 64k" -c "w -P 67 128k 64k" base.raw >/dev/null
qemu-io -f qcow2 -c "w -P 69 64k 64k" -c "w -z 128k 64k" top.qcow2 >/dev/null

step() { printf '\n$ %s\n' "$*"; "$@"; }
step ./nbdgw info top.qcow2
step ./nbdgw map --output=json top.qcow2
step qemu-img map --output=json top.qcow2
step ./nbdgw map --context qemu:allocation-depth top.qcow2
step ./nbdgw map --context base:allocation top.qcow2
echo
echo "# qemu:joint-allocation of the overlay alone (seed 000 expects 3 / 4 / 7 / 3):"
step ./nbdgw map --no-backing --context qemu:joint-allocation top.qcow2
echo
echo "# nbdgw is built at $top/nbdgw ($("$top/nbdgw" --version)); nbdgw help lists the commands."
