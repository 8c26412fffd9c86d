package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// probeBytes is QEMU's BLOCK_PROBE_BUF_SIZE: find_image_format() reads
// the first 512 bytes of a file (zero-padded past its end) and asks every
// format driver's probe function to score them.
const probeBytes = 512

// Format names (QEMU's driver names) that probing can report.
const (
	FormatRaw   = "raw"
	FormatQcow2 = "qcow2"
)

// unreadFormats are the formats QEMU 10.0 probes that nbdgw does not
// read: they are recognised so that they are refused by name instead of
// being served as raw bytes.
var unreadFormats = []string{"bochs", "cloop", "dmg", "luks", "parallels", "qcow", "qed", "vdi", "vhdx", "vmdk", "vpc"}

// ProbeFormat is QEMU's bdrv_probe_all() over the drivers QEMU 10.0 has
// (block/*.c, each driver's bdrv_probe): it names the format of a file
// whose first bytes are buf (only the first 512 are looked at; a shorter
// buf reads as zero-padded, as QEMU pads a short file) and whose name is
// filename (the dmg driver probes by name). The highest score wins;
// raw scores 1 and so is chosen when nothing else matches.
func ProbeFormat(buf []byte, filename string) string {
	b := make([]byte, probeBytes)
	copy(b, buf)
	best, score := FormatRaw, 1 // raw_probe
	try := func(name string, s int) {
		if s > score {
			best, score = name, s
		}
	}
	be, le := binary.BigEndian, binary.LittleEndian
	// block/qcow2.c qcow2_probe and block/qcow.c qcow_probe: one magic,
	// told apart by version.
	if be.Uint32(b) == Magic {
		if v := be.Uint32(b[4:]); v >= 2 {
			try(FormatQcow2, 100)
		} else if v == 1 {
			try("qcow", 100)
		}
	}
	// block/vmdk.c vmdk_probe: a sparse extent's magic, or a text
	// descriptor whose first line that is no comment or blank is version=N.
	if m := be.Uint32(b); m == 0x434f5744 /* COWD */ || m == 0x4b444d56 /* KDMV */ || vmdkDescriptor(b) {
		try("vmdk", 100)
	}
	// block/vpc.c: the footer copy at the start of a dynamic VHD. A fixed
	// VHD has its footer only at the end: QEMU probes it as raw.
	if bytes.HasPrefix(b, []byte("conectix")) {
		try("vpc", 100)
	}
	// block/vhdx.c: the file type identifier.
	if bytes.HasPrefix(b, []byte("vhdxfile")) {
		try("vhdx", 100)
	}
	// block/vdi.c: the signature after the 64-byte text.
	if le.Uint32(b[0x40:]) == 0xbeda107f {
		try("vdi", 100)
	}
	// block/qed.c: "QED\0".
	if le.Uint32(b) == 0x00444551 {
		try("qed", 100)
	}
	// crypto/block-luks.c qcrypto_block_luks_has_format: magic, version 1.
	if bytes.HasPrefix(b, []byte("LUKS\xba\xbe")) && be.Uint16(b[6:]) == 1 {
		try("luks", 100)
	}
	// block/parallels.c parallels_probe.
	if (bytes.HasPrefix(b, []byte("WithoutFreeSpace")) || bytes.HasPrefix(b, []byte("WithouFreSpacExt"))) && le.Uint32(b[16:]) == 2 {
		try("parallels", 100)
	}
	// block/bochs.c bochs_probe: strcmp() of NUL-terminated fields.
	if cstr(b[0:32]) == "Bochs Virtual HD Image" && cstr(b[32:48]) == "Redolog" {
		if st := cstr(b[48:64]); st == "Undoable" || st == "Volatile" || st == "Growing" {
			if v := le.Uint32(b[64:]); v == 0x00020000 || v == 0x00010000 {
				try("bochs", 100)
			}
		}
	}
	// block/cloop.c cloop_probe: the V2.0 shell script header, score 2.
	if bytes.HasPrefix(b, []byte("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")) {
		try("cloop", 2)
	}
	// block/dmg.c dmg_probe: by file name alone, score 2.
	if len(filename) > 4 && strings.HasSuffix(filename, ".dmg") {
		try("dmg", 2)
	}
	return best
}

// cstr is a C string in a fixed-size field (the whole field when it has
// no NUL).
func cstr(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// vmdkDescriptor is the text half of vmdk_probe(): comment lines and
// lines of spaces may come first, then "version=1", "2" or "3" ending
// the line (LF or CRLF).
func vmdkDescriptor(b []byte) bool {
	p := 0
	for p < len(b) {
		switch b[p] {
		case '#':
			for p < len(b) && b[p] != '\n' {
				p++
			}
			p++
			continue
		case ' ':
			for p < len(b) && b[p] == ' ' {
				p++
			}
			if p < len(b) && b[p] == '\r' {
				p++
			}
			if p == len(b) || b[p] != '\n' {
				return false
			}
			p++
			continue
		}
		rest := b[p:]
		for _, v := range []string{"version=1", "version=2", "version=3"} {
			if bytes.HasPrefix(rest, []byte(v+"\n")) || bytes.HasPrefix(rest, []byte(v+"\r\n")) {
				return true
			}
		}
		return false
	}
	return false
}

// checkFormatName refuses a format name nbdgw does not read: forced with
// -f (top) or recorded as a backing format in an image header. file is the
// file it applies to ("" for a forced format checked before anything is
// opened).
func checkFormatName(file, format string, forced bool) error {
	switch format {
	case "", FormatRaw, FormatQcow2:
		return nil
	}
	return unsupportedFormat(file, format, false, forced)
}

// unsupportedFormat is the refusal of a format nbdgw does not read.
// probedTop adds the hint to force raw, which only the top image can be.
func unsupportedFormat(file, format string, probedTop, forced bool) error {
	known := false
	for _, f := range unreadFormats {
		known = known || f == format
	}
	var msg string
	switch {
	case known:
		msg = "image format " + format + " is not supported (nbdgw reads qcow2 and raw)"
		if format == "qcow" {
			msg = "image format qcow is not supported (nbdgw reads qcow2 and raw; this header has the qcow2 magic with version 1)"
		}
	case forced:
		msg = fmt.Sprintf("unknown image format %q (nbdgw reads qcow2 and raw)", format)
	default:
		msg = fmt.Sprintf("unknown backing format %q (nbdgw reads qcow2 and raw)", format)
	}
	if probedTop {
		msg += "; use -f raw to read the file as raw"
	}
	if file == "" {
		return fmt.Errorf("%s: %w", msg, ErrUnsupported)
	}
	return &FormatError{File: file, Offset: -1, Index: -1, Msg: msg, Err: ErrUnsupported}
}

// probeFile reads the probe buffer of h (fileLen bytes long) and names its
// format. An empty file is raw, as in QEMU's find_image_format().
func probeFile(h *hostFile, fileLen int64) (string, []byte, error) {
	if fileLen == 0 {
		return FormatRaw, nil, nil
	}
	buf := make([]byte, min(fileLen, probeBytes))
	if !readDirect(h, buf) {
		if err := h.readFull(buf, 0); err != nil {
			return "", nil, fmt.Errorf("%s: reading the image to determine its format: %w", SafeName(h.name), err)
		}
	}
	return ProbeFormat(buf, h.name), buf, nil
}

// readDirect reads the start of h into p with O_DIRECT, through a second
// descriptor of the same open file, so that the read leaves nothing in the
// page cache: for a raw file the probe buffer is guest data, and a page
// cached over an ext4 unwritten extent makes SEEK_DATA report data where
// QEMU, asking afterwards, would have seen a hole. Where O_DIRECT is not
// available (tmpfs) it returns false and the caller reads through the page
// cache.
func readDirect(h *hostFile, p []byte) bool {
	fd := openDirect(h)
	if fd < 0 {
		return false
	}
	defer unix.Close(fd)
	ok, err := readAtDirect(fd, p, 0)
	return ok && err == nil
}

// directAlign is the alignment of O_DIRECT reads: offsets, lengths and
// buffers on 4 KiB suit devices of 512- and 4096-byte logical blocks.
const directAlign = 4096

// openDirect opens h's file again with O_DIRECT (-1 if it cannot).
func openDirect(h *hostFile) int {
	fd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(int(h.f.Fd())), unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1
	}
	return fd
}

// readAtDirect reads len(p) bytes at off through the O_DIRECT descriptor
// fd, by way of an aligned bounce buffer; bytes past the end of the file
// read as zero. ok false (EINVAL: the file system refuses this alignment)
// means nothing was read and the caller reads through the page cache.
func readAtDirect(fd int, p []byte, off int64) (ok bool, err error) {
	start := off &^ (directAlign - 1)
	end := (off + int64(len(p)) + directAlign - 1) &^ (directAlign - 1)
	raw := make([]byte, end-start+directAlign)
	skip := (directAlign - int(uintptr(unsafe.Pointer(&raw[0]))&(directAlign-1))) & (directAlign - 1)
	buf := raw[skip : skip+int(end-start)]
	got := 0
	for got < len(buf) {
		n, err := unix.Pread(fd, buf[got:], start+int64(got))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			if got == 0 && err == unix.EINVAL {
				return false, nil
			}
			return true, err
		}
		got += n
		if n == 0 || n%directAlign != 0 {
			break // the end of the file
		}
	}
	clear(buf[got:])
	copy(p, buf[off-start:])
	return true, nil
}

// checkProbedWrite is QEMU's restriction on a raw image whose format was
// probed (block/raw-format.c raw_co_pwritev(): bs->probed): a write that
// touches the first 512 bytes is refused with EPERM when those bytes,
// after the write, would probe as another format. Otherwise a guest could
// write a qcow2 header into its own disk and, at the next probing open,
// have the host read any file it names as a backing file. p nil means
// zeroes (write-zeroes and discard, which QEMU does not check: we do, as
// zeroing part of the sector can complete a magic too).
func (r *rawLayer) checkProbedWrite(off int64, p []byte, length int64) error {
	if !r.probed || off >= probeBytes || length <= 0 {
		return nil
	}
	buf := make([]byte, probeBytes)
	if err := r.h.readFull(buf, 0); err != nil {
		return err
	}
	end := min(off+length, probeBytes)
	if p == nil {
		clear(buf[off:end])
	} else {
		copy(buf[off:end], p)
	}
	if f := ProbeFormat(buf, ""); f != FormatRaw {
		return &probedWriteError{fmt.Sprintf("%s: write refused: the first 512 bytes would probe as %s, and the image's format was probed, not given (open it with -f raw to allow such writes)", SafeName(r.h.name), f)}
	}
	return nil
}

// probedWriteError is ErrReadOnly (NBD_EPERM, as QEMU's -EPERM) with its
// own message.
type probedWriteError struct{ msg string }

func (e *probedWriteError) Error() string        { return e.msg }
func (e *probedWriteError) Is(target error) bool { return target == ErrReadOnly }

// refuseWritableNoBacking refuses Options.Writable with Options.NoBacking
// on an image that has a backing file, before anything is locked or
// written: a write to part of a cluster copies the rest from below, and
// with the backing file hidden that would be zeroes, which would then
// hide the backing file's data for good. It only peeks at the header;
// whatever else is wrong with the file the real open reports.
func refuseWritableNoBacking(o *opener, path, format string) error {
	f, err := o.conf.openPeek(path, "image "+SafeName(path))
	if err != nil || f == nil {
		return err
	}
	h := &hostFile{name: path, f: f}
	defer h.close()
	adviseRandom(h)
	fileLen, err := h.length()
	if err != nil {
		return nil
	}
	if format == "" {
		if format, _, err = probeFile(h, fileLen); err != nil {
			return nil
		}
	}
	if format != FormatQcow2 {
		return nil
	}
	first, err := readHeaderCluster(h, fileLen)
	if err != nil {
		return nil
	}
	hdr, err := ParseHeader(path, first, fileLen)
	if err != nil || hdr.BackingFile == "" {
		return nil
	}
	return fmt.Errorf("--writable --no-backing: %s has a backing file (%q); partial-cluster writes would copy zeroes over its data: open it with its backing file, read-only, or with --snapshot", SafeName(path), hdr.BackingFile)
}
