#!/bin/bash
# bench-hostile.sh: nbdgw serve against qemu-nbd 10 under hostile load, in
# one run on this machine (the figures of issue 15, items 2 and 3). The
# measurements are the integration tests, which drive both servers the
# same way and log one FIGURE line per server and case:
#   - TestAdmissionStalledReaders: 64 clients each with one 32 MiB READ
#     outstanding and unread, on a plain and on a compressed qcow2; the
#     slowest of a fresh client's 4 KiB reads over 2 s, and the server's
#     peak VmRSS/VmHWM sampled every 5 ms from /proc/PID/status;
#   - TestAdmissionIdleConnections: 2000 TCP connections that never send
#     a byte (127.0.0.2..., 50 per address), then how long nbdinfo --size
#     from 127.0.0.1 takes;
#   - TestAdmissionHandshakenIdle: 256 clients idle after the handshake
#     (nbdgw only: qemu-nbd -e 0 has no limit either).
# qemu-nbd runs as `qemu-nbd -r -f qcow2 -e 0` (no connection limit;
# its default -e 1 would serve one client). nbdgw's limits are asserted by
# the tests; qemu-nbd's figures are only logged.
# Usage: scripts/bench-hostile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
go test -count=1 -v -run 'TestAdmissionStalledReaders|TestAdmissionIdleConnections|TestAdmissionHandshakenIdle' ./integration/ |
	tee /dev/stderr | grep -o 'FIGURE .*'
