#!/bin/bash
# vmtest.sh — test `nbdgw attach/detach/list` against a real Linux nbd driver.
#
# Boots Debian's cloud kernel (linux-image-*-cloud-amd64, which ships nbd.ko)
# under qemu-system-x86_64 with a busybox-static initramfs holding a static
# nbdgw and test images built here with qemu-img. The guest's /init runs the
# checks, prints "ok - ..." / "not ok - ..." lines and a final
#   NBDGW-VMTEST: PASS     or     NBDGW-VMTEST: FAIL ...
# on the serial console and powers off.
#
# The write test keeps its chain (a fresh qcow2 overlay over a base) on a
# virtio disk, an ext4 filesystem image the guest mounts at /work: attach
# --writable, mkfs.ext4, files written and their sha256 list kept next to the
# chain; again with --connections 2; then a read-only attach that reads them
# back and cannot write. After the VM is gone the host reads the disk with
# debugfs: qemu-img check must exit 0 on the overlay, the base's sha256 must
# not have changed, and the files must read back with their sha256 through a
# read-only `nbdgw mount` of the overlay and a loop mount of its disk (root,
# /dev/fuse and loop devices needed; else that part is skipped and says so).
# Host checks print "ok - host: ..." / "not ok - host: ...".
# An nbds:// attach (TLS terminated by nbdgw, credentials made here with
# openssl) against a `serve --tls-required` inside the guest must read a
# small image exactly and survive a restart of the server (LINK_DEAD, redial
# with a new TLS handshake, RECONFIGURE).
# Exit status: 0 when the guest said PASS and every host check passed, 1 otherwise.
#
# Environment:
#   NBDGW_VM_CACHE        cache for the kernel package and its extracted tree
#                         (default ${XDG_CACHE_HOME:-$HOME/.cache}/nbdgw-vm)
#   NBDGW_VM_KERNEL_PKG   kernel package to use (default: what the
#                         linux-image-cloud-amd64 meta-package depends on)
#   NBDGW_VM_ACCEL        qemu accelerator (default tcg; kvm if you have it)
#   NBDGW_VM_TIMEOUT      seconds before the VM is killed (default 150)
#   NBDGW_VM_KEEP=1       keep the work directory
#   NBDGW_VM_NO_INSTALL=1 never apt-get install missing tools
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${NBDGW_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nbdgw-vm}
accel=${NBDGW_VM_ACCEL:-tcg}
vm_timeout=${NBDGW_VM_TIMEOUT:-150}
. "$repo/scripts/env.sh"
export PATH=$PATH:/usr/sbin:/sbin

log() { echo "vmtest: $*" >&2; }
die() { log "$*"; exit 1; }

t_start=$(date +%s)

# --- tools -----------------------------------------------------------------
# command -> Debian package
declare -A need=(
	[qemu-system-x86_64]=qemu-system-x86 [qemu-img]=qemu-utils
	[busybox]=busybox-static [cpio]=cpio [depmod]=kmod
	[mkfs.ext4]=e2fsprogs [mke2fs]=e2fsprogs [debugfs]=e2fsprogs [dpkg-deb]=dpkg [ldd]=libc-bin
	[apt-get]=apt [gzip]=gzip [sha256sum]=coreutils [timeout]=coreutils [openssl]=openssl
)
missing=()
for c in "${!need[@]}"; do
	command -v "$c" >/dev/null 2>&1 || missing+=("${need[$c]}")
done
# A dynamic busybox cannot run alone in the initramfs (ldd fails on a
# static executable).
is_static() { ! ldd "$1" >/dev/null 2>&1; }
bb=$(command -v busybox || true)
if [ -n "$bb" ] && ! is_static "$bb"; then
	missing+=(busybox-static)
fi
if [ ${#missing[@]} -gt 0 ]; then
	mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
	if [ "$(id -u)" = 0 ] && [ -z "${NBDGW_VM_NO_INSTALL:-}" ]; then
		log "installing ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
		bb=$(command -v busybox)
	else
		die "missing tools; install the Debian packages: ${missing[*]}"
	fi
fi
command -v go >/dev/null || die "go not found (PATH or /usr/local/go/bin)"

# --- kernel ----------------------------------------------------------------
mkdir -p "$cache"
resolve_pkg() {
	apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
pkg=${NBDGW_VM_KERNEL_PKG:-$(resolve_pkg)}
if [ -z "$pkg" ] && [ "$(id -u)" = 0 ]; then
	# Fresh machine without apt lists (apt-get update installs nothing).
	apt-get update -qq >&2 || true
	pkg=$(resolve_pkg)
fi
if [ -z "$pkg" ]; then
	# No apt lists: fall back to the newest kernel already cached.
	pkg=$(cd "$cache" && ls -d linux-image-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)
fi
[ -n "$pkg" ] || die "cannot find Debian's cloud kernel package (apt-cache depends linux-image-cloud-amd64 says nothing; run apt-get update)"
ktree=$cache/$pkg
if ! ls "$ktree"/boot/vmlinuz-* >/dev/null 2>&1; then
	log "fetching $pkg"
	dl=$(mktemp -d "$cache/dl.XXXXXX")
	if (cd "$dl" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >&2); then
		rm -rf "$ktree.tmp"
		dpkg-deb -x "$dl"/*.deb "$ktree.tmp"
		rm -rf "$dl"
		mv "$ktree.tmp" "$ktree"
		# Keep one kernel: drop the trees of older packages.
		for old in "$cache"/linux-image-*-cloud-amd64; do
			[ "$old" = "$ktree" ] || rm -rf "$old"
		done
	else
		rm -rf "$dl"
		old=$(cd "$cache" && ls -d linux-image-*-cloud-amd64 2>/dev/null | sort -V | tail -n1 || true)
		[ -n "$old" ] || die "apt-get download $pkg failed"
		log "apt-get download $pkg failed; using the cached $old"
		pkg=$old
		ktree=$cache/$pkg
	fi
fi
vmlinuz=$(ls "$ktree"/boot/vmlinuz-* | head -n1)
kver=${vmlinuz##*/vmlinuz-}
kmods=$ktree/lib/modules/$kver
nbdko=$(ls "$kmods"/kernel/drivers/block/nbd.ko* 2>/dev/null | head -n1 || true)
[ -n "$nbdko" ] || die "$pkg has no nbd module under $kmods"
log "kernel $kver ($pkg)"

# --- work tree -----------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/nbdgw-vmtest.XXXXXX")
mpid=
cleanup() {
	# The host read-back may have left a loop mount and nbdgw mount behind.
	mountpoint -q "$work/ro" 2>/dev/null && umount "$work/ro"
	if [ -n "$mpid" ]; then
		kill -TERM "$mpid" 2>/dev/null
		wait "$mpid" 2>/dev/null
	fi
	if [ -z "${NBDGW_VM_KEEP:-}" ]; then
		mountpoint -q "$work/fuse" 2>/dev/null || rm -rf "$work"
	fi
}
trap cleanup EXIT
[ -n "${NBDGW_VM_KEEP:-}" ] && log "keeping $work"
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,images,lib/modules/"$kver"/kernel/drivers/block}

log "building a static nbdgw"
(cd "$repo" && CGO_ENABLED=0 go build -trimpath -o "$root/bin/nbdgw" ./cmd/nbdgw)
cp "$bb" "$root/bin/busybox"
# mkfs.ext4 for the write test: e2fsprogs' mke2fs and its libraries, as ldd
# lists them (busybox's mke2fs makes ext2 only).
mke2fs_bin=$(command -v mke2fs)
mkdir -p "$root/sbin" "$root/etc"
cp "$mke2fs_bin" "$root/sbin/mke2fs"
ln -s mke2fs "$root/sbin/mkfs.ext4"
for lib in $(ldd "$mke2fs_bin" | grep -o '/[^ ]*'); do
	mkdir -p "$root$(dirname "$lib")"
	cp -L "$lib" "$root$lib"
done
[ -e /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"

# Modules: nbd.ko (uncompressed, so that the plain finit_module path works),
# virtio_blk and what it needs (the write test keeps its images on a virtio
# disk that the host reads back afterwards), plus the files depmod and
# github.com/pmorjan/kmod read.
copy_mod() { # path under $kmods/kernel without the .ko suffix
	local src dst=$root/lib/modules/$kver/kernel/$1.ko
	src=$(ls "$kmods/kernel/$1".ko* 2>/dev/null | head -n1 || true)
	[ -n "$src" ] || die "$pkg has no module $1 under $kmods"
	mkdir -p "$(dirname "$dst")"
	case $src in
	*.ko) cp "$src" "$dst" ;;
	*.ko.xz) xz -dc "$src" >"$dst" ;;
	*.ko.zst) zstd -qdc "$src" >"$dst" ;;
	*.ko.gz) gzip -dc "$src" >"$dst" ;;
	*) die "unknown module format $src" ;;
	esac
}
copy_mod drivers/block/nbd
if grep -q '^CONFIG_VIRTIO_BLK=m' "$ktree/boot/config-$kver" 2>/dev/null; then
	for m in virtio/virtio virtio/virtio_ring virtio/virtio_pci virtio/virtio_pci_modern_dev \
		virtio/virtio_pci_legacy_dev block/virtio_blk; do
		# Some are built in or absent in other configurations.
		ls "$kmods/kernel/drivers/$m".ko* >/dev/null 2>&1 && copy_mod "drivers/$m"
	done
fi
for f in modules.builtin modules.builtin.modinfo modules.order; do
	[ -e "$kmods/$f" ] && cp "$kmods/$f" "$root/lib/modules/$kver/"
done
depmod -b "$root" "$kver"
[ -s "$root/lib/modules/$kver/modules.dep" ] || die "depmod produced no modules.dep"

# --- images --------------------------------------------------------------------
# base.qcow2: an ext4 filesystem with base.txt and random.bin.
# overlay.qcow2: backed by base.qcow2, holding only the clusters that adding
# overlay.txt changed (qemu-img convert -B writes the difference).
log "building test images"
img=$work/img
mkdir -p "$img/content"
echo "hello from the base layer" >"$img/content/base.txt"
head -c 3000000 /dev/urandom >"$img/content/random.bin"
echo "hello from the overlay" >"$img/overlay.txt"
mkfs.ext4 -q -F -b 4096 -L nbdgw -d "$img/content" "$img/fs1.raw" 64M
cp "$img/fs1.raw" "$img/fs2.raw"
debugfs -w -R "write $img/overlay.txt overlay.txt" "$img/fs2.raw" >/dev/null 2>&1
(
	cd "$root/images"
	qemu-img convert -f raw -O qcow2 "$img/fs1.raw" base.qcow2
	qemu-img convert -f raw -O qcow2 -B base.qcow2 -F qcow2 "$img/fs2.raw" overlay.qcow2
	qemu-img create -q -f qcow2 -u -b gone.qcow2 -F qcow2 orphan.qcow2 64M
)
# The expected guest-visible content, as QEMU reads the chain.
qemu-img convert -O raw "$root/images/overlay.qcow2" "$img/expect.raw"
cmp -s "$img/expect.raw" "$img/fs2.raw" || die "qemu-img reads the chain differently from what was written"
overlay_alloc=$(qemu-img map --output=json "$root/images/overlay.qcow2" | grep -c '"depth": 0, "present": true, "zero": false, "data": true' || true)
[ "$overlay_alloc" -gt 0 ] || die "overlay.qcow2 holds no data of its own: the chain test would not test the chain"
{
	echo "SHA_OVERLAY=$(sha256sum <"$img/expect.raw" | cut -d' ' -f1)"
	echo "SIZE_OVERLAY=$(stat -c %s "$img/expect.raw")"
	echo "SHA_RANDOM=$(sha256sum <"$img/content/random.bin" | cut -d' ' -f1)"
	echo "BASE_TXT='$(cat "$img/content/base.txt")'"
	echo "OVERLAY_TXT='$(cat "$img/overlay.txt")'"
} >"$root/images/expected.env"
rm -rf "$img"

# The write test's chain lives on a virtio disk, an ext4 filesystem the
# guest mounts at /work and the host reads back after the VM is gone:
# wbase.qcow2 (a copy of base.qcow2) and a fresh, empty overlay on it.
wdir=$work/wdisk
mkdir -p "$wdir"
cp "$root/images/base.qcow2" "$wdir/wbase.qcow2"
(cd "$wdir" && qemu-img create -q -f qcow2 -b wbase.qcow2 -F qcow2 woverlay.qcow2)
(cd "$wdir" && qemu-img create -q -f qcow2 -b wbase.qcow2 -F qcow2 crash.qcow2)
sha_wbase=$(sha256sum <"$wdir/wbase.qcow2" | cut -d' ' -f1)
echo "SHA_WBASE=$sha_wbase" >>"$root/images/expected.env"
mkfs.ext4 -q -F -b 4096 -L nbdgw-work -d "$wdir" "$work/wdisk.img" 256M
rm -rf "$wdir"

# X.509 credentials for the TLS attach, made here with openssl: a CA, a
# server certificate for 127.0.0.1 and a client certificate (the server
# checks it, as qemu-nbd's verify-peer=on), in the layout --tls-creds reads.
tls=$root/tls
mkdir -p "$tls"
ecnew=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ecnew[@]}" -keyout "$work/ca-key.pem" -out "$tls/ca-cert.pem" \
	-days 2 -subj /CN=nbdgw-vmtest-CA 2>/dev/null
for n in server client; do
	openssl req "${ecnew[@]}" -keyout "$tls/$n-key.pem" -out "$work/$n.csr" -subj "/CN=$n" 2>/dev/null
	printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=%s\n' "${n}Auth" >"$work/$n.ext"
	openssl x509 -req -in "$work/$n.csr" -CA "$tls/ca-cert.pem" -CAkey "$work/ca-key.pem" \
		-CAcreateserial -days 2 -extfile "$work/$n.ext" -out "$tls/$n-cert.pem" 2>/dev/null
done
[ -s "$tls/client-cert.pem" ] || die "openssl made no TLS credentials"
# The TLS attach reads a small image (TLS under TCG costs ~0.3 s/MiB):
# 8 MiB, 2 MiB of random data among zeroes.
truncate -s 8M "$work/tls.raw"
dd if=/dev/urandom of="$work/tls.raw" bs=1M seek=3 count=2 conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$work/tls.raw" "$root/images/tls.qcow2"
qemu-img convert -O raw "$root/images/tls.qcow2" "$work/tls-expect.raw"
echo "SHA_TLS=$(sha256sum <"$work/tls-expect.raw" | cut -d' ' -f1)" >>"$root/images/expected.env"
rm -f "$work/tls.raw" "$work/tls-expect.raw"

# --- guest /init ---------------------------------------------------------------
cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
ip link set lo up 2>/dev/null
echo "vmtest-guest: booted after $(cut -d' ' -f1 /proc/uptime)s"
. /images/expected.env
fails=0
ok() { echo "ok - $*"; }
notok() { echo "not ok - $*"; fails=$((fails + 1)); }
check() { d=$1; shift; if "$@"; then ok "$d"; else notok "$d"; fi; }
section() { echo "# $(cut -d' ' -f1 /proc/uptime)s: $*"; }

# start_attach LOG ARGS...: run nbdgw attach in the background; set $pid and,
# once it printed the device, $dev. Fails if it exits first.
start_attach() {
	alog=$1; shift
	nbdgw attach "$@" >"$alog" 2>&1 &
	pid=$!
	dev=
	i=0
	while [ $i -lt 600 ]; do
		dev=$(head -n1 "$alog" 2>/dev/null)
		case $dev in /dev/nbd*) [ -b "$dev" ] && return 0 ;; esac
		kill -0 $pid 2>/dev/null || { cat "$alog"; dev=; return 1; }
		sleep 0.05
		i=$((i + 1))
	done
	cat "$alog"
	dev=
	return 1
}
# wait_exit PID: wait up to 20s for a process to exit, return its status.
wait_exit() {
	i=0
	while kill -0 "$1" 2>/dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
	kill -0 "$1" 2>/dev/null && { kill -9 "$1"; return 124; }
	wait "$1"
}
# expect_fail DESC PATTERN ARGS...: nbdgw ARGS must fail saying PATTERN.
expect_fail() {
	d=$1; pat=$2; shift 2
	out=$(timeout 30 nbdgw "$@" 2>&1) && { notok "$d: succeeded: $out"; return; }
	case $out in *$pat*) ok "$d ($out)" ;; *) notok "$d: error does not say '$pat': $out" ;; esac
}
# sockets PID: how many sockets the process holds (its server ends + netlink).
sockets() { ls -l /proc/$1/fd | grep -c 'socket:'; }
connected_count() { nbdgw list | grep -c ' yes ' || true; }
# none_connected: STATUS reports a device connected until the kernel's
# receive workers let go of it, a moment after the sockets closed.
none_connected() {
	i=0
	while [ "$(connected_count)" != 0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
	[ "$(connected_count)" = 0 ]
}
dev_sha() { sha256sum "$1" | cut -d' ' -f1; }
# check_content DEV: the device is the overlay chain, byte for byte and as a filesystem.
check_content() {
	check "$1: sha256 of $2 is the chain's raw content (qemu-img convert)" [ "$(dev_sha "$2")" = "$SHA_OVERLAY" ]
	check "$1: size is $SIZE_OVERLAY" [ "$(blockdev --getsize64 "$2")" = "$SIZE_OVERLAY" ]
	check "$1: read-only device" [ "$(blockdev --getro "$2")" = 1 ]
	if mount -t ext4 -o ro "$2" /mnt; then
		check "$1: base.txt (from the backing file) reads back" [ "$(cat /mnt/base.txt)" = "$BASE_TXT" ]
		check "$1: overlay.txt (from the overlay) reads back" [ "$(cat /mnt/overlay.txt)" = "$OVERLAY_TXT" ]
		check "$1: random.bin reads back" [ "$(sha256sum /mnt/random.bin | cut -d' ' -f1)" = "$SHA_RANDOM" ]
		umount /mnt
	else
		notok "$1: mount -t ext4 -o ro $2"
	fi
}

t0=$(cut -d' ' -f1 /proc/uptime)
check "nbd module not loaded before attach" sh -c '! grep -q "^nbd " /proc/modules'

# 1. One connection, the kernel picks the device.
section "1 connection"
if start_attach /tmp/a1.log /images/overlay.qcow2; then
	ok "attach overlay.qcow2 -> $dev"
	check "attach loaded the nbd module" grep -q "^nbd " /proc/modules
	check_content "1 connection" "$dev"
	socks1=$(sockets $pid)
	nbdgw list >/tmp/list.txt 2>&1
	cat /tmp/list.txt
	check "list shows $dev connected with backend nbdgw:/images/overlay.qcow2" \
		grep -q "^$dev  *yes  *$pid .*nbdgw:/images/overlay.qcow2\$" /tmp/list.txt
	check "list shows disconnected devices too" grep -q "^/dev/nbd[0-9]*  *no " /tmp/list.txt

	# Bad input while a device is attached.
	section "bad input"
	expect_fail "attach to the busy $dev" "busy" attach --device "$dev" /images/base.qcow2
	expect_fail "attach with an index out of range" "out of range" attach --device /dev/nbd99999 /images/base.qcow2
	# base.qcow2 is the backing file of the attached overlay, locked
	# read-only and shared as QEMU locks it: readers may open it (the busy
	# device refuses the one above), a writer is refused by the lock first.
	expect_fail "attach --writable of the overlay's backing file" 'Failed to get "write" lock, held by nbdgw' attach --writable --device "$dev" /images/base.qcow2
	expect_fail "serve --writable of the attached overlay" 'Failed to get "write" lock, held by nbdgw' serve --writable --socket /tmp/locked.sock /images/overlay.qcow2
	expect_fail "attach an image that does not exist" "no such file" attach /images/missing.qcow2
	expect_fail "attach an overlay whose backing file is missing" "gone.qcow2" attach /images/orphan.qcow2
	expect_fail "attach an NBD URI that refuses the connection" "refused" attach nbd://127.0.0.1:1/
	expect_fail "attach an nbd+unix URI without a server" "no such file" attach "nbd+unix:///?socket=/tmp/none.sock"
	expect_fail "detach a device that is not connected" "not connected" detach /dev/nbd15
	expect_fail "detach something that is not an nbd device" "not an nbd device" detach /dev/null
	check "failed attaches left no device connected" [ "$(connected_count)" = 1 ]

	check "detach $dev" nbdgw detach "$dev"
	check "attach exits 0 after detach" wait_exit $pid
	check "$dev is disconnected after detach" none_connected
else
	notok "attach overlay.qcow2"
fi

# 2. Two connections on a chosen device; SIGTERM ends it.
section "2 connections"
if start_attach /tmp/a2.log --connections 2 --device /dev/nbd3 /images/overlay.qcow2; then
	check "attach --connections 2 --device /dev/nbd3 uses /dev/nbd3" [ "$dev" = /dev/nbd3 ]
	socks2=$(sockets $pid)
	check "2 connections: one more server socket than with 1 ($socks2 vs $socks1)" [ "$socks2" = $((socks1 + 1)) ]
	check_content "2 connections" "$dev"
	kill -TERM $pid
	check "attach exits 0 on SIGTERM" wait_exit $pid
	check "/dev/nbd3 disconnected after SIGTERM" none_connected
else
	notok "attach --connections 2"
fi

# 3. A device beyond nbds_max (16), which CONNECT creates; attach killed
#    with SIGKILL: the device stays configured with dead sockets, and
#    detach must still clean it up.
section "SIGKILL"
if start_attach /tmp/a4.log --device /dev/nbd20 /images/base.qcow2; then
	check "attach --device /dev/nbd20 (created by CONNECT) uses it" [ "$dev" = /dev/nbd20 ]
	kill -9 $pid
	wait $pid 2>/dev/null
	check "after SIGKILL of attach, detach $dev cleans up" nbdgw detach "$dev"
	check "no device connected after that detach" none_connected
else
	notok "attach --device /dev/nbd20 base.qcow2"
fi

# 4. An NBD URI served by nbdgw serve; the server dies and comes back:
#    LINK_DEAD -> redial -> RECONFIGURE, the device survives.
section "NBD URI"
if nbdgw serve --help 2>&1 | grep -q socket; then
	nbdgw serve --socket /tmp/nbd.sock /images/overlay.qcow2 2>/tmp/serve.log &
	spid=$!
	i=0; while [ ! -S /tmp/nbd.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
	if start_attach /tmp/a3.log --connections 2 "nbd+unix:///?socket=/tmp/nbd.sock"; then
		ok "attach nbd+unix URI -> $dev"
		check "URI: sha256 of $dev" [ "$(dev_sha "$dev")" = "$SHA_OVERLAY" ]
		check "URI: read-only device" [ "$(blockdev --getro "$dev")" = 1 ]
		kill -9 $spid; wait $spid 2>/dev/null
		rm -f /tmp/nbd.sock
		echo 3 >/proc/sys/vm/drop_caches
		sleep 1
		nbdgw serve --socket /tmp/nbd.sock /images/overlay.qcow2 2>>/tmp/serve.log &
		spid=$!
		check "URI: device reads again after the server restarted" [ "$(dev_sha "$dev")" = "$SHA_OVERLAY" ]
		grep -q "replaced a dead connection" /tmp/a3.log && ok "URI: dead connection replaced (RECONFIGURE)" ||
			{ cat /tmp/a3.log; notok "URI: dead connection replaced (RECONFIGURE)"; }
		check "URI: detach" nbdgw detach "$dev"
		check "URI: attach exits 0 after detach" wait_exit $pid
	else
		notok "attach nbd+unix URI"
	fi
	kill $spid 2>/dev/null
else
	echo "# skip: nbdgw serve --socket not available"
fi

# 4b. nbds:// against a --tls-required nbdgw serve on 127.0.0.1: attach
#    terminates TLS itself and hands the kernel a socketpair; the server
#    dies and comes back: the redial redoes the TLS handshake.
section "NBD URI over TLS"
# listening PORT: /proc/net/tcp has 127.0.0.1:PORT in state LISTEN (0A).
listening() {
	p=$(printf '%04X' "$1")
	i=0
	while ! grep -q "0100007F:$p 00000000:0000 0A" /proc/net/tcp && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
	grep -q "0100007F:$p 00000000:0000 0A" /proc/net/tcp
}
tserve() { nbdgw serve --listen 127.0.0.1:10809 --tls-creds /tls --tls-required /images/tls.qcow2 2>>/tmp/tserve.log & spid=$!; }
tserve
if listening 10809; then
	expect_fail "TLS: a plain attach to the --tls-required server" "TLS" attach nbd://127.0.0.1:10809/
	if start_attach /tmp/a5.log --tls-creds /tls nbds://127.0.0.1:10809/; then
		ok "attach nbds://127.0.0.1:10809/ --tls-creds -> $dev"
		check "TLS: sha256 of $dev" [ "$(dev_sha "$dev")" = "$SHA_TLS" ]
		check "TLS: read-only device" [ "$(blockdev --getro "$dev")" = 1 ]
		section "NBD URI over TLS: server restart"
		kill -9 $spid; wait $spid 2>/dev/null
		echo 3 >/proc/sys/vm/drop_caches
		sleep 1
		tserve
		check "TLS: the server listens again" listening 10809
		check "TLS: device reads again after the server restarted" [ "$(dev_sha "$dev")" = "$SHA_TLS" ]
		grep -q "replaced a dead connection" /tmp/a5.log && ok "TLS: dead connection replaced after a new TLS handshake (RECONFIGURE)" ||
			{ cat /tmp/a5.log; notok "TLS: dead connection replaced (RECONFIGURE)"; }
		check "TLS: detach" nbdgw detach "$dev"
		check "TLS: attach exits 0 after detach" wait_exit $pid
	else
		notok "attach nbds://127.0.0.1:10809/ --tls-creds /tls"
	fi
else
	cat /tmp/tserve.log
	notok "TLS: nbdgw serve --tls-creds --tls-required listens on 127.0.0.1:10809"
fi
kill $spid 2>/dev/null
sed "s|^|# /tmp/tserve.log: |" /tmp/tserve.log

# 5. Writes. The chain is on the virtio disk (/work): a fresh overlay over
#    a base. mkfs.ext4 and files through /dev/nbdN, once with 1 connection
#    (ended by detach), once with 2 (ended by SIGTERM); then a read-only
#    attach reads everything back and cannot write. The host checks the
#    image again after the VM is gone.
section "writable"
modprobe virtio_pci 2>/dev/null
modprobe virtio_blk 2>/dev/null
i=0; while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /work
W=/work/woverlay.qcow2
# write_set NAME MIB: NAME/f1..fMIB.bin of random content and a note on the
# mounted filesystem, their sha256 list in /work/NAME.sha256 (for the host).
write_set() {
	mkdir -p "/mnt/$1"
	i=1
	while [ $i -le "$2" ]; do head -c 1048576 /dev/urandom >"/mnt/$1/f$i.bin"; i=$((i + 1)); done
	echo "$1 written through $dev" >"/mnt/$1/note.txt"
	(cd "/mnt/$1" && sha256sum f*.bin note.txt >"/work/$1.sha256")
}
# verify_set NAME: the files of NAME read back with their sha256.
verify_set() { (cd "/mnt/$1" && sha256sum -c -s "/work/$1.sha256"); }
# flags_check LABEL DEV: what the server's flags made of the queue.
flags_check() {
	q=/sys/block/${2#/dev/}/queue
	check "$1: not read-only" [ "$(blockdev --getro "$2")" = 0 ]
	check "$1: write cache on (SEND_FLUSH; write_cache '$(cat $q/write_cache)')" [ "$(cat $q/write_cache)" = "write back" ]
	check "$1: FUA (SEND_FUA)" [ "$(cat $q/fua)" = 1 ]
	check "$1: discard (SEND_TRIM; discard_max_bytes $(cat $q/discard_max_bytes))" [ "$(cat $q/discard_max_bytes)" -gt 0 ]
}
# finish_writes LABEL: sync, unmount, flush the device's buffers; the
# kernel must have sent flushes (field 16 of the device's stat).
finish_writes() {
	sync
	check "$1: umount" umount /mnt
	check "$1: blockdev --flushbufs" blockdev --flushbufs "$dev"
	st=$(cat /sys/block/${dev#/dev/}/stat)
	echo "# $dev stat: $st"
	check "$1: the kernel sent writes and flushes (stat: $(echo $st | awk '{print $5 " writes, " $16 " flushes"}'))" \
		sh -c "echo '$st' | awk '{exit !(\$5 > 0 && \$16 > 0)}'"
}
if [ -b /dev/vda ] && mount -t ext4 /dev/vda /work; then
	check "writable: base sha256 before" [ "$(dev_sha /work/wbase.qcow2)" = "$SHA_WBASE" ]
	if start_attach /tmp/w1.log --writable $W; then
		ok "attach --writable woverlay.qcow2 -> $dev"
		flags_check "writable" "$dev"
		check "list shows $dev writable (RO false) with backend nbdgw:$W" \
			sh -c "nbdgw list | grep -q '^$dev  *yes  *$pid  *[0-9]*  *false  *nbdgw:$W\$'"
		t=$(cut -d' ' -f1 /proc/uptime)
		echo "# write_zeroes_max_bytes $(cat /sys/block/${dev#/dev/}/queue/write_zeroes_max_bytes) (this kernel's nbd driver may not send WRITE_ZEROES)"
		if /sbin/mkfs.ext4 -q -F -b 4096 -L written "$dev" >/tmp/mkfs.log 2>&1; then
			ok "mkfs.ext4 -F $dev ($(awk "BEGIN{print $(cut -d' ' -f1 /proc/uptime)-$t}")s)"
			check "mkfs.ext4 discarded the device through TRIM (discards in stat: $(awk '{print $12}' /sys/block/${dev#/dev/}/stat))" \
				[ "$(awk '{print $12}' /sys/block/${dev#/dev/}/stat)" -gt 0 ]
			if mount -t ext4 "$dev" /mnt; then
				write_set set1 4
				check "writable: set1 reads back before umount" verify_set set1
				finish_writes "writable"
			else
				notok "writable: mount -t ext4 $dev"
			fi
		else
			cat /tmp/mkfs.log
			notok "mkfs.ext4 -F $dev"
		fi
		check "writable: detach $dev" nbdgw detach "$dev"
		check "attach --writable exits 0 after detach (image closed and flushed)" wait_exit $pid
		check "writable: $dev disconnected" none_connected
	else
		notok "attach --writable woverlay.qcow2"
	fi

	section "writable, 2 connections"
	if start_attach /tmp/w2.log --writable --connections 2 $W; then
		ok "attach --writable --connections 2 woverlay.qcow2 -> $dev"
		flags_check "writable, 2 connections" "$dev"
		if mount -t ext4 "$dev" /mnt; then
			check "2 connections: set1 (written before) reads back" verify_set set1
			write_set set2 4
			check "2 connections: set2 reads back before umount" verify_set set2
			finish_writes "2 connections"
		else
			notok "2 connections: mount -t ext4 $dev"
		fi
		kill -TERM $pid
		check "attach --writable --connections 2 exits 0 on SIGTERM (image closed and flushed)" wait_exit $pid
		check "2 connections: $dev disconnected" none_connected
	else
		notok "attach --writable --connections 2 woverlay.qcow2"
	fi

	section "read-only after writes"
	sha_w=$(dev_sha $W)
	if start_attach /tmp/w3.log $W; then
		check "read-only: $dev is read-only" [ "$(blockdev --getro "$dev")" = 1 ]
		check "read-only: a write to $dev fails" sh -c "! dd if=/dev/zero of=$dev bs=4096 count=1 oflag=direct 2>/dev/null"
		if mount -t ext4 -o ro "$dev" /mnt; then
			check "read-only: set1 reads back" verify_set set1
			check "read-only: set2 reads back" verify_set set2
			umount /mnt
		else
			notok "read-only: mount -t ext4 -o ro $dev"
		fi
		check "read-only: detach" nbdgw detach "$dev"
		check "read-only: attach exits 0" wait_exit $pid
	else
		notok "attach woverlay.qcow2 read-only"
	fi
	check "read-only attach left woverlay.qcow2 byte-identical" [ "$(dev_sha $W)" = "$sha_w" ]

	# kill -9 of a writable attach while writes go on: what was flushed
	# before must survive (the host checks crash.qcow2).
	section "writable, SIGKILL"
	if start_attach /tmp/w4.log --writable /work/crash.qcow2; then
		head -c 2097152 /dev/urandom >/tmp/flushed.bin
		check "SIGKILL: 2 MiB written with conv=fsync (NBD_CMD_FLUSH)" \
			dd if=/tmp/flushed.bin of="$dev" bs=1048576 conv=fsync 2>/dev/null
		sha256sum </tmp/flushed.bin | cut -d' ' -f1 >/work/crash.sha256
		# Direct I/O: the writes reach the server while it is killed
		# (buffered ones would still sit in the page cache).
		dd if=/dev/urandom of="$dev" bs=1048576 count=24 seek=8 oflag=direct 2>/dev/null &
		ddpid=$!
		sleep 0.5
		echo "# SIGKILL while writing: $(awk '{print $5}' /sys/block/${dev#/dev/}/stat) writes done"
		kill -9 $pid
		wait $pid 2>/dev/null
		check "SIGKILL: detach $dev afterwards" nbdgw detach "$dev"
		wait $ddpid 2>/dev/null
		check "SIGKILL: no device connected" none_connected
	else
		notok "attach --writable crash.qcow2"
	fi
	check "writable: base sha256 unchanged (backing files are never written)" [ "$(dev_sha /work/wbase.qcow2)" = "$SHA_WBASE" ]
	ls -ls /work | sed 's/^/# /'
	umount /work || notok "umount /work"
else
	notok "writable: no virtio disk /dev/vda to hold the chain (mount -t ext4 /dev/vda failed)"
fi

section "done"
for f in /tmp/a*.log /tmp/w*.log; do [ -e "$f" ] && sed "s|^|# $f: |" "$f"; done
t1=$(cut -d' ' -f1 /proc/uptime)
echo "vmtest-guest: checks took $(awk "BEGIN{print $t1-$t0}")s"
if [ $fails = 0 ]; then
	echo "NBDGW-VMTEST: PASS"
else
	dmesg | tail -n 40
	echo "NBDGW-VMTEST: FAIL ($fails checks failed)"
fi
sync
poweroff -f
EOF
chmod +x "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"
log "initramfs $(du -h "$work/initrd.gz" | cut -f1), booting"

# --- boot ----------------------------------------------------------------------
console=$work/console.log
t_boot=$(date +%s)
set +e
timeout "$vm_timeout" qemu-system-x86_64 \
	-accel "$accel" -m 1024 -smp 2 -nographic -no-reboot -net none \
	-kernel "$vmlinuz" -initrd "$work/initrd.gz" \
	-drive "file=$work/wdisk.img,format=raw,if=virtio" \
	-append "console=ttyS0 panic=-1 quiet loglevel=4" </dev/null 2>&1 | tee "$console"
qrc=${PIPESTATUS[0]}
set -e
t_end=$(date +%s)
log "VM ran $((t_end - t_boot))s, whole test $((t_end - t_start))s (qemu exit $qrc)"
[ "$qrc" = 124 ] && die "FAIL: the VM did not finish within ${vm_timeout}s"

# --- host: what the guest wrote, read back from the virtio disk -------------
# Printed as "ok - host: ..." / "not ok - host: ..." like the guest's checks.
hostfails=0
hcheck() {
	local d=$1
	shift
	if "$@"; then echo "ok - host: $d"; else echo "not ok - host: $d"; hostfails=$((hostfails + 1)); fi
}
out=$work/out
mkdir -p "$out"
for f in wbase.qcow2 woverlay.qcow2 set1.sha256 set2.sha256 crash.qcow2 crash.sha256; do
	debugfs -R "dump /$f $out/$f" "$work/wdisk.img" >/dev/null 2>&1 || true
done
hcheck "the guest left woverlay.qcow2 and both sha256 lists on its disk" \
	test -s "$out/woverlay.qcow2" -a -s "$out/set1.sha256" -a -s "$out/set2.sha256"
if [ -s "$out/woverlay.qcow2" ]; then
	crc=0
	qemu-img check "$out/woverlay.qcow2" >"$out/check.txt" 2>&1 || crc=$?
	sed 's/^/vmtest: qemu-img check: /' "$out/check.txt" >&2
	hcheck "qemu-img check woverlay.qcow2 exits 0 (exit $crc)" [ "$crc" = 0 ]
	hcheck "wbase.qcow2 sha256 unchanged" [ "$(sha256sum <"$out/wbase.qcow2" | cut -d' ' -f1)" = "$sha_wbase" ]
	fuse=$work/fuse ro=$work/ro
	mkdir -p "$fuse" "$ro"
	if [ "$(id -u)" != 0 ] || [ ! -e /dev/fuse ] || [ ! -e /dev/loop-control ]; then
		echo "# skip: host read-back through nbdgw mount + loop mount needs root, /dev/fuse and /dev/loop-control"
	else
		"$root/bin/nbdgw" mount "$out/woverlay.qcow2" "$fuse" 2>"$out/mount.log" &
		mpid=$!
		for _ in $(seq 100); do [ -e "$fuse/disk" ] && break; sleep 0.1; done
		# The loop mount comes from this shell, not from nbdgw's process.
		if mount -o ro,loop -t ext4 "$fuse/disk" "$ro"; then
			for set in set1 set2; do
				hcheck "$set reads back through nbdgw mount + mount -o ro,loop ($(wc -l <"$out/$set.sha256") files)" \
					sh -c 'cd "$1" && sha256sum --quiet -c "$2"' _ "$ro/$set" "$out/$set.sha256"
			done
			umount "$ro" || hcheck "umount $ro" false
		else
			hcheck "mount -o ro,loop $fuse/disk" false
		fi
		kill -TERM "$mpid" 2>/dev/null || true
		mrc=0
		wait "$mpid" || mrc=$?
		mpid=
		hcheck "nbdgw mount (read-only) exits 0 (exit $mrc)" [ "$mrc" = 0 ]
		hcheck "read-only nbdgw mount left woverlay.qcow2 clean (qemu-img check)" qemu-img check -q "$out/woverlay.qcow2"
		cat "$out/mount.log" >&2
	fi
fi
if [ -s "$out/crash.qcow2" ] && [ -s "$out/crash.sha256" ]; then
	crc=0
	qemu-img check "$out/crash.qcow2" >"$out/crash-check.txt" 2>&1 || crc=$?
	sed 's/^/vmtest: qemu-img check crash.qcow2: /' "$out/crash-check.txt" >&2
	hcheck "after kill -9 of attach --writable, qemu-img check exits 0 or 3 (leaks only) (exit $crc)" \
		[ "$crc" = 0 -o "$crc" = 3 ]
	qemu-img convert -O raw "$out/crash.qcow2" "$out/crash.raw"
	hcheck "after kill -9, the 2 MiB flushed before it read back (qemu-img convert)" \
		[ "$(head -c 2097152 "$out/crash.raw" | sha256sum | cut -d' ' -f1)" = "$(cat "$out/crash.sha256")" ]
else
	hcheck "the guest left crash.qcow2 and crash.sha256 on its disk" false
fi
t_host=$(date +%s)
log "host read-back took $((t_host - t_end))s; whole test $((t_host - t_start))s"

if [ $hostfails = 0 ] && grep -q '^NBDGW-VMTEST: PASS' "$console" && ! grep -q '^not ok' "$console"; then
	log "PASS"
	exit 0
fi
die "FAIL (see the console output and host checks above)"
