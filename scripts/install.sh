#!/usr/bin/env bash
# Builds nbdgw and installs it with its man pages and example systemd units.
# Usage: scripts/install.sh [PREFIX]   (default /usr/local; DESTDIR is honoured)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
prefix="${1:-/usr/local}"
dest="${DESTDIR:-}"
install -d "$dest$prefix/bin" "$dest$prefix/share/man/man1" "$dest$prefix/share/doc/nbdgw/systemd"
# -buildvcs=true: nbdgw --version names the revision it was built from.
go build -buildvcs=true -trimpath -o "$dest$prefix/bin/nbdgw" ./cmd/nbdgw
install -m 0644 man/*.1 "$dest$prefix/share/man/man1/"
install -m 0644 contrib/systemd/* "$dest$prefix/share/doc/nbdgw/systemd/"
echo "installed $dest$prefix/bin/nbdgw ($("$dest$prefix/bin/nbdgw" --version)), man pages, systemd examples in $prefix/share/doc/nbdgw/systemd"
