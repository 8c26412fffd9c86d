#!/usr/bin/env bash
# Builds libnbd 1.22.2 (Debian trixie's source package) into a cache dir, for
# the tests that need libnbd >= 1.18: 64-bit block status, block-status
# filters, extended headers in nbdinfo/nbdcopy. Debian 12 ships 1.14.
#
# The machine's package sources stay as they are: trixie's deb-src entry,
# its package lists and apt's caches live in a private temp directory
# (Dir::Etc::SourceList, Dir::State::Lists, Dir::Cache). `apt-get source
# --download-only` fetches the .dsc and checks the tarball against the
# signed Sources index; the build uses the upstream release tarball
# (.orig.tar.gz, generated files included, so no OCaml is needed).
#
# Usage: scripts/build-libnbd.sh [PREFIX]   (default ~/.cache/nbdgw-libnbd)
# Reuses PREFIX when PREFIX/bin/nbdsh of the version exists. Prints PREFIX.
set -euo pipefail
version=1.22.2
prefix="${1:-${NBDGW_LIBNBD:-$HOME/.cache/nbdgw-libnbd}}"
if [ -x "$prefix/bin/nbdinfo" ] && [ -f "$prefix/.version" ] && [ "$(cat "$prefix/.version")" = "$version" ]; then
	echo "$prefix"
	exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

# What ./configure and make need (dpkg-dev for dpkg-source; perl's pod2man
# for the man pages; python3-dev for nbdsh).
deps=(build-essential dpkg-dev pkg-config libgnutls28-dev libxml2-dev python3-dev perl)
missing=()
for p in "${deps[@]}"; do
	dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/parts" "$tmp/src"
echo "deb-src http://deb.debian.org/debian trixie main" >"$tmp/sources.list"
apt=(apt-get -q -o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=$tmp/parts"
	-o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o "APT::Sandbox::User=root")
"${apt[@]}" update >&2
(cd "$tmp/src" && "${apt[@]}" source --download-only "libnbd=$version-1" >&2)
# Verify the upstream tarball against the .dsc (apt did it too; this
# guards the path from .dsc to the file we untar).
(cd "$tmp/src" && grep -q "$(sha256sum "libnbd_$version.orig.tar.gz" | cut -d' ' -f1)" "libnbd_$version-1.dsc")
tar -C "$tmp/src" -xzf "$tmp/src/libnbd_$version.orig.tar.gz"
cd "$tmp/src/libnbd-$version"
# The build's output goes to a log, shown only when the build fails.
log="$tmp/build.log"
build() {
	./configure --prefix="$prefix" --disable-ocaml --disable-golang --disable-rust --disable-fuse \
		--disable-ublk --without-bash-completions \
		--with-python-installdir="$prefix/lib/python3/site-packages" &&
		make -j"$(nproc)" && rm -rf "$prefix" && make install
}
echo "build-libnbd: building libnbd $version into $prefix" >&2
if ! build >"$log" 2>&1; then
	tail -n 60 "$log" >&2
	echo "build-libnbd: the build of libnbd $version failed (the log's end above)" >&2
	exit 1
fi
echo "$version" >"$prefix/.version"
echo "$prefix"
