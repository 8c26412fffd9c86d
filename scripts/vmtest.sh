#!/bin/bash
# vmtest.sh — test `nbdgw attach/detach/list` against a real Linux nbd driver.
#
# Boots Debian's cloud kernel (linux-image-*-cloud-amd64, which ships nbd.ko)
# under qemu-system-x86_64 with a busybox-static initramfs holding a static
# nbdgw and test images built here with qemu-img. The guest's /init runs the
# checks, prints "ok - ..." / "not ok - ..." lines and a final
#   NBDGW-VMTEST: PASS     or     NBDGW-VMTEST: FAIL ...
# on the serial console and powers off. Exit status: 0 on PASS, 1 otherwise.
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
export PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin

log() { echo "vmtest: $*" >&2; }
die() { log "$*"; exit 1; }

t_start=$(date +%s)

# --- tools -----------------------------------------------------------------
# command -> Debian package
declare -A need=(
	[qemu-system-x86_64]=qemu-system-x86 [qemu-img]=qemu-utils
	[busybox]=busybox-static [cpio]=cpio [depmod]=kmod
	[mkfs.ext4]=e2fsprogs [debugfs]=e2fsprogs [dpkg-deb]=dpkg
	[apt-get]=apt [gzip]=gzip [sha256sum]=coreutils [timeout]=coreutils
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
if [ -z "${NBDGW_VM_KEEP:-}" ]; then
	trap 'rm -rf "$work"' EXIT
else
	log "keeping $work"
fi
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,images,lib/modules/"$kver"/kernel/drivers/block}

log "building a static nbdgw"
(cd "$repo" && CGO_ENABLED=0 go build -trimpath -o "$root/bin/nbdgw" ./cmd/nbdgw)
cp "$bb" "$root/bin/busybox"

# Modules: nbd.ko (uncompressed, so that the plain finit_module path works)
# plus the files depmod and github.com/pmorjan/kmod read.
case $nbdko in
*.ko) cp "$nbdko" "$root/lib/modules/$kver/kernel/drivers/block/nbd.ko" ;;
*.ko.xz) xz -dc "$nbdko" >"$root/lib/modules/$kver/kernel/drivers/block/nbd.ko" ;;
*.ko.zst) zstd -qdc "$nbdko" >"$root/lib/modules/$kver/kernel/drivers/block/nbd.ko" ;;
*.ko.gz) gzip -dc "$nbdko" >"$root/lib/modules/$kver/kernel/drivers/block/nbd.ko" ;;
*) die "unknown module format $nbdko" ;;
esac
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
	expect_fail "attach --writable" "writes are not supported yet" attach --writable /images/overlay.qcow2
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

section "done"
for f in /tmp/a*.log; do sed "s|^|# $f: |" "$f"; done
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
	-append "console=ttyS0 panic=-1 quiet loglevel=4" </dev/null 2>&1 | tee "$console"
qrc=${PIPESTATUS[0]}
set -e
t_end=$(date +%s)
log "VM ran $((t_end - t_boot))s, whole test $((t_end - t_start))s (qemu exit $qrc)"
[ "$qrc" = 124 ] && die "FAIL: the VM did not finish within ${vm_timeout}s"
if grep -q '^NBDGW-VMTEST: PASS' "$console" && ! grep -q '^not ok' "$console"; then
	log "PASS"
	exit 0
fi
die "FAIL (see the console output above)"
