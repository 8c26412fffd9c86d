package qcow2

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// Magic is the first four bytes of every qcow2 image: "QFI\xfb".
const Magic = 0x514649fb

// Limits taken from QEMU's qcow2 driver; an image beyond them is refused
// before anything is allocated.
const (
	minClusterBits   = 9
	maxClusterBits   = 21
	maxL1Bytes       = 32 << 20 // QCOW_MAX_L1_SIZE
	maxRefTableBytes = 8 << 20  // QCOW_MAX_REFTABLE_SIZE
	maxBackingName   = 1023
	maxSnapshots     = 65536
	maxBitmaps       = 65535
	maxBitmapDirSize = 64 << 20 // QCOW2_MAX_BITMAP_DIRECTORY_SIZE
	maxBitmapName    = 1023
	maxHeaderExtData = 1 << 20 // an extension cannot exceed the first cluster anyway
	v2HeaderLength   = 72
	v3HeaderLength   = 104
)

// Incompatible feature bits.
const (
	IncompatDirty        = 1 << 0
	IncompatCorrupt      = 1 << 1
	IncompatDataFile     = 1 << 2
	IncompatCompression  = 1 << 3
	IncompatExtendedL2   = 1 << 4
	incompatKnown        = IncompatDirty | IncompatCorrupt | IncompatDataFile | IncompatCompression | IncompatExtendedL2
	CompatLazyRefcounts  = 1 << 0
	AutoclearBitmaps     = 1 << 0
	AutoclearDataFileRaw = 1 << 1
)

// Header extension types.
const (
	extEnd           = 0x00000000
	extBackingFormat = 0xe2792aca
	extFeatureTable  = 0x6803f857
	extBitmaps       = 0x23852875
	extCrypto        = 0x0537be77
	extDataFile      = 0x44415441
)

// CompressionType is the header's compression_type field.
type CompressionType uint8

const (
	CompressionZlib CompressionType = 0
	CompressionZstd CompressionType = 1
)

func (c CompressionType) String() string {
	switch c {
	case CompressionZlib:
		return "zlib"
	case CompressionZstd:
		return "zstd"
	}
	return fmt.Sprintf("compression-type-%d", uint8(c))
}

// Header is a decoded qcow2 header with its extensions.
type Header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	Size                  uint64
	CryptMethod           uint32
	L1Size                uint32
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64
	IncompatibleFeatures  uint64
	CompatibleFeatures    uint64
	AutoclearFeatures     uint64
	RefcountOrder         uint32
	HeaderLength          uint32
	Compression           CompressionType

	BackingFile   string // raw name as stored, "" if none
	BackingFormat string // backing format extension, "" if absent
	DataFile      string // external data file name extension, "" if absent
	HasCrypto     bool   // full disk encryption header extension present
	FeatureNames  map[featureKey]string

	// Bitmaps extension (valid only when HasBitmapExt).
	HasBitmapExt    bool
	NbBitmaps       uint32
	BitmapDirSize   uint64
	BitmapDirOffset uint64
}

type featureKey struct {
	typ uint8 // 0 incompatible, 1 compatible, 2 autoclear
	bit uint8
}

// ClusterSize is 1 << ClusterBits.
func (h *Header) ClusterSize() int64 { return 1 << h.ClusterBits }

// ExtendedL2 reports the extended L2 entries (subclusters) feature.
func (h *Header) ExtendedL2() bool { return h.IncompatibleFeatures&IncompatExtendedL2 != 0 }

// featureName names an incompatible feature bit, from the image's feature
// name table if it has one.
func (h *Header) featureName(typ, bit uint8) string {
	if n, ok := h.FeatureNames[featureKey{typ, bit}]; ok && n != "" {
		return n
	}
	switch {
	case typ == 0 && bit == 0:
		return "dirty bit"
	case typ == 0 && bit == 1:
		return "corrupt bit"
	case typ == 0 && bit == 2:
		return "external data file"
	case typ == 0 && bit == 3:
		return "compression type"
	case typ == 0 && bit == 4:
		return "extended L2 entries"
	}
	return fmt.Sprintf("unknown feature bit %d", bit)
}

// Features lists the header's feature bits by name, for nbdgw info.
func (h *Header) Features() []string {
	var out []string
	for bit := uint8(0); bit < 64; bit++ {
		if h.IncompatibleFeatures&(1<<bit) != 0 {
			out = append(out, h.featureName(0, bit))
		}
	}
	for bit := uint8(0); bit < 64; bit++ {
		if h.CompatibleFeatures&(1<<bit) == 0 {
			continue
		}
		if bit == 0 {
			out = append(out, "lazy refcounts")
		} else {
			out = append(out, fmt.Sprintf("compatible bit %d", bit))
		}
	}
	for bit := uint8(0); bit < 64; bit++ {
		if h.AutoclearFeatures&(1<<bit) == 0 {
			continue
		}
		switch bit {
		case 0:
			out = append(out, "bitmaps")
		case 1:
			out = append(out, "raw external data")
		default:
			out = append(out, fmt.Sprintf("autoclear bit %d", bit))
		}
	}
	return out
}

// ParseHeader decodes the header and header extensions from the first bytes
// of an image (at least the first cluster, or the whole file if shorter).
// fileSize is the size of the whole file, used to bound table offsets. The
// checks are those QEMU makes when it opens an image; everything that
// would make a later read go out of bounds is refused here.
func ParseHeader(name string, b []byte, fileSize int64) (*Header, error) {
	bad := func(off int64, format string, args ...any) error {
		return corrupt(name, off, -1, format, args...)
	}
	if len(b) < v2HeaderLength {
		if len(b) >= 4 && binary.BigEndian.Uint32(b) != Magic {
			return nil, &FormatError{File: name, Offset: 0, Index: -1, Msg: "no qcow2 magic", Err: ErrNotQcow2}
		}
		return nil, bad(0, "truncated header: %d bytes, need %d", len(b), v2HeaderLength)
	}
	be := binary.BigEndian
	if be.Uint32(b[0:]) != Magic {
		return nil, &FormatError{File: name, Offset: 0, Index: -1, Msg: "no qcow2 magic", Err: ErrNotQcow2}
	}
	h := &Header{
		Version:               be.Uint32(b[4:]),
		BackingFileOffset:     be.Uint64(b[8:]),
		BackingFileSize:       be.Uint32(b[16:]),
		ClusterBits:           be.Uint32(b[20:]),
		Size:                  be.Uint64(b[24:]),
		CryptMethod:           be.Uint32(b[32:]),
		L1Size:                be.Uint32(b[36:]),
		L1TableOffset:         be.Uint64(b[40:]),
		RefcountTableOffset:   be.Uint64(b[48:]),
		RefcountTableClusters: be.Uint32(b[56:]),
		NbSnapshots:           be.Uint32(b[60:]),
		SnapshotsOffset:       be.Uint64(b[64:]),
		RefcountOrder:         4,
		HeaderLength:          v2HeaderLength,
	}
	switch h.Version {
	case 2:
	case 3:
		if len(b) < v3HeaderLength {
			return nil, bad(0, "truncated v3 header: %d bytes, need %d", len(b), v3HeaderLength)
		}
		h.IncompatibleFeatures = be.Uint64(b[72:])
		h.CompatibleFeatures = be.Uint64(b[80:])
		h.AutoclearFeatures = be.Uint64(b[88:])
		h.RefcountOrder = be.Uint32(b[96:])
		h.HeaderLength = be.Uint32(b[100:])
	default:
		return nil, &FormatError{File: name, Offset: 4, Index: -1, Msg: fmt.Sprintf("unsupported qcow2 version %d", h.Version), Err: ErrNotQcow2}
	}
	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return nil, bad(20, "cluster size 2^%d out of range 2^%d..2^%d", h.ClusterBits, minClusterBits, maxClusterBits)
	}
	cs := uint64(1) << h.ClusterBits
	if h.Version == 3 {
		if h.HeaderLength < v3HeaderLength {
			return nil, bad(100, "header length %d too small for v3", h.HeaderLength)
		}
		if uint64(h.HeaderLength) > cs {
			return nil, bad(100, "header length %d larger than cluster size %d", h.HeaderLength, cs)
		}
		if uint64(len(b)) < uint64(h.HeaderLength) {
			return nil, bad(0, "truncated header: file has %d bytes, header length is %d", len(b), h.HeaderLength)
		}
		if h.HeaderLength > v3HeaderLength {
			h.Compression = CompressionType(b[104])
		}
	}
	if h.RefcountOrder > 6 {
		return nil, bad(96, "refcount order %d out of range 0..6", h.RefcountOrder)
	}
	if h.CryptMethod != 0 {
		what := "AES"
		if h.CryptMethod == 2 {
			what = "LUKS"
		} else if h.CryptMethod != 1 {
			what = fmt.Sprintf("method %d", h.CryptMethod)
		}
		return nil, unsupported(name, "encrypted image (%s encryption) is not supported", what)
	}
	if h.Size > 1<<62 {
		return nil, bad(24, "virtual size %d too large", h.Size)
	}
	if h.Version == 3 && h.IncompatibleFeatures&IncompatCompression == 0 && h.Compression != CompressionZlib {
		return nil, bad(104, "compression type %d set without the compression type feature bit", h.Compression)
	}
	if h.Compression != CompressionZlib && h.Compression != CompressionZstd {
		return nil, unsupported(name, "unknown compression type %d", uint8(h.Compression))
	}

	// Tables must be cluster aligned and inside the file (QEMU's
	// validate_table_offset), and of bounded size.
	checkTable := func(what string, field int64, off, entries, entrySize, max uint64) error {
		if off%cs != 0 {
			return bad(field, "%s offset %#x not aligned to cluster size %d", what, off, cs)
		}
		if entries > max/entrySize {
			return bad(field, "%s too large: %d entries", what, entries)
		}
		if off > uint64(fileSize) || entries*entrySize > uint64(fileSize)-off {
			return bad(field, "%s at %#x (%d bytes) past end of file (%d bytes)", what, off, entries*entrySize, fileSize)
		}
		return nil
	}
	if err := checkTable("L1 table", 40, h.L1TableOffset, uint64(h.L1Size), 8, maxL1Bytes); err != nil {
		return nil, err
	}
	if err := checkTable("refcount table", 48, h.RefcountTableOffset, uint64(h.RefcountTableClusters)*cs/8, 8, maxRefTableBytes); err != nil {
		return nil, err
	}
	if h.NbSnapshots > maxSnapshots {
		return nil, bad(60, "too many snapshots: %d", h.NbSnapshots)
	}
	if h.NbSnapshots > 0 && h.SnapshotsOffset%cs != 0 {
		return nil, bad(64, "snapshot table offset %#x not aligned to cluster size %d", h.SnapshotsOffset, cs)
	}
	if h.NbSnapshots > 0 && h.SnapshotsOffset >= uint64(fileSize) {
		return nil, bad(64, "snapshot table at %#x past end of file (%d bytes)", h.SnapshotsOffset, fileSize)
	}
	// The L1 table must cover the virtual size.
	entrySize := uint64(8)
	if h.IncompatibleFeatures&IncompatExtendedL2 != 0 {
		entrySize = 16
	}
	l2Bytes := cs / entrySize * cs // guest bytes per L2 table
	need := (h.Size + l2Bytes - 1) / l2Bytes
	if uint64(h.L1Size) < need {
		return nil, bad(36, "L1 table too small: %d entries, virtual size %d needs %d", h.L1Size, h.Size, need)
	}
	if h.IncompatibleFeatures&IncompatExtendedL2 != 0 && h.ClusterBits < 14 {
		return nil, bad(20, "extended L2 entries need a cluster size of at least 16 KiB, got %d", cs)
	}

	// Extensions live between the header and the backing file name (or the
	// end of the first cluster).
	extEnd64 := cs
	if h.BackingFileOffset != 0 && h.BackingFileOffset < extEnd64 {
		extEnd64 = h.BackingFileOffset
	}
	if extEnd64 > uint64(len(b)) {
		extEnd64 = uint64(len(b))
	}
	if err := h.parseExtensions(name, b[:extEnd64], fileSize); err != nil {
		return nil, err
	}

	unknown := h.IncompatibleFeatures &^ incompatKnown
	if unknown != 0 {
		var names []string
		for bit := uint8(0); bit < 64; bit++ {
			if unknown&(1<<bit) != 0 {
				names = append(names, SafeName(h.featureName(0, bit)))
			}
		}
		return nil, unsupported(name, "unsupported incompatible feature(s): %s", strings.Join(names, ", "))
	}
	if h.HasCrypto {
		return nil, unsupported(name, "full disk encryption header present: encryption is not supported")
	}
	if h.IncompatibleFeatures&IncompatDataFile == 0 && h.DataFile != "" {
		return nil, bad(-1, "external data file name extension without the data file feature bit")
	}
	if h.AutoclearFeatures&AutoclearDataFileRaw != 0 && h.IncompatibleFeatures&IncompatDataFile == 0 {
		// QEMU ignores (and clears) data_file_raw without a data file.
		h.AutoclearFeatures &^= AutoclearDataFileRaw
	}

	if h.BackingFileOffset != 0 {
		if h.BackingFileSize > maxBackingName {
			return nil, bad(16, "backing file name too long: %d bytes", h.BackingFileSize)
		}
		// QEMU refuses a name outside the first cluster.
		end := h.BackingFileOffset + uint64(h.BackingFileSize)
		if h.BackingFileOffset > cs || end > cs || end > uint64(len(b)) { // the first test also rules out a wrapped sum
			return nil, bad(8, "backing file name at %#x (%d bytes) outside the first cluster", h.BackingFileOffset, h.BackingFileSize)
		}
		h.BackingFile = string(b[h.BackingFileOffset:end])
	}
	return h, nil
}

func (h *Header) parseExtensions(name string, b []byte, fileSize int64) error {
	be := binary.BigEndian
	off := uint64(h.HeaderLength)
	for {
		if off+8 > uint64(len(b)) {
			// QEMU stops silently when no room is left for another
			// extension header.
			return nil
		}
		typ := be.Uint32(b[off:])
		length := uint64(be.Uint32(b[off+4:]))
		off += 8
		if typ == extEnd {
			return nil
		}
		if length > uint64(len(b))-off {
			return corrupt(name, int64(off-8), -1, "header extension %#x length %d exceeds the header area", typ, length)
		}
		data := b[off : off+length]
		switch typ {
		case extBackingFormat:
			h.BackingFormat = string(data)
		case extDataFile:
			h.DataFile = string(data)
		case extCrypto:
			h.HasCrypto = true
		case extFeatureTable:
			if h.FeatureNames == nil {
				h.FeatureNames = make(map[featureKey]string)
			}
			for i := 0; i+48 <= len(data); i += 48 {
				n := data[i+2 : i+48]
				if z := indexByte(n, 0); z >= 0 {
					n = n[:z]
				}
				h.FeatureNames[featureKey{data[i], data[i+1]}] = string(n)
			}
		case extBitmaps:
			if length < 24 {
				return corrupt(name, int64(off-8), -1, "bitmaps extension too short: %d bytes", length)
			}
			h.HasBitmapExt = true
			h.NbBitmaps = be.Uint32(data[0:])
			h.BitmapDirSize = be.Uint64(data[8:])
			h.BitmapDirOffset = be.Uint64(data[16:])
			if be.Uint32(data[4:]) != 0 {
				return corrupt(name, int64(off+4), -1, "bitmaps extension reserved field is not zero")
			}
			if h.NbBitmaps == 0 || h.NbBitmaps > maxBitmaps {
				return corrupt(name, int64(off), -1, "bad number of bitmaps: %d", h.NbBitmaps)
			}
			if h.BitmapDirSize > maxBitmapDirSize {
				return corrupt(name, int64(off+8), -1, "bitmap directory too large: %d bytes", h.BitmapDirSize)
			}
			if h.BitmapDirOffset%uint64(h.ClusterSize()) != 0 {
				return corrupt(name, int64(off+16), -1, "bitmap directory offset %#x not cluster aligned", h.BitmapDirOffset)
			}
			if h.BitmapDirOffset > uint64(fileSize) || h.BitmapDirSize > uint64(fileSize)-h.BitmapDirOffset {
				return corrupt(name, int64(off+16), -1, "bitmap directory at %#x (%d bytes) past end of file", h.BitmapDirOffset, h.BitmapDirSize)
			}
		}
		off += (length + 7) &^ 7
	}
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}
