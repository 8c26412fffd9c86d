# Sourced by the scripts: finds Go and lets it fetch the toolchain go.mod
# names. Go is in /usr/local/go on the project machines; elsewhere
# install-deps.sh installs Debian's golang-1.23-go (bookworm-backports),
# which downloads the toolchain from the Go module proxy by itself.
for d in /usr/local/go/bin /usr/lib/go-1.23/bin; do
	case ":$PATH:" in *":$d:"*) ;; *) [ -x "$d/go" ] && PATH="$PATH:$d" ;; esac
done
export PATH
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
# Tools the tests use, at versions the Go module proxy serves.
STATICCHECK=honnef.co/go/tools/cmd/staticcheck@v0.8.2
