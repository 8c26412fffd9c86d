package fusefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Partition is one partition of the guest disk, as Linux would expose it as
// /dev/XpN: Number is N, Start and Length are byte offsets into the disk,
// already bounded by the disk size.
type Partition struct {
	Number        int
	Start, Length int64
	Scheme        string // "mbr" or "gpt"
}

// Partition table limits. Linux stops at 256 partitions per disk
// (DISK_MAX_PARTS); the GPT entry array is bounded so that a hostile header
// cannot make us allocate more than maxGPTArray bytes.
const (
	sectorSize     = 512
	maxPartitions  = 256
	maxGPTArray    = 1 << 20
	maxEBRChain    = 256
	mbrSignatureAt = 510
	mbrTableAt     = 446
)

// errBadGPT marks a GPT header or entry array that fails validation.
var errBadGPT = errors.New("invalid GPT")

// Partitions reads the MBR or GPT partition table of a disk of size bytes.
// It follows the Linux kernel's block/partitions/{efi,msdos}.c in what it
// accepts, so pN here is /dev/XpN there. A disk without a recognisable
// table has no partitions (and a nil error). Every offset and length read
// from the table is checked against size: partitions that start past the
// end are dropped, partitions that run past it are cut short (Linux does
// the same and warns). The MBR extended partition container itself is not
// listed; its logical partitions are p5, p6, ... as on Linux.
func Partitions(r io.ReaderAt, size int64) ([]Partition, error) {
	if size < sectorSize {
		return nil, nil
	}
	mbr := make([]byte, sectorSize)
	if err := readFull(r, mbr, 0); err != nil {
		return nil, err
	}
	if binary.LittleEndian.Uint16(mbr[mbrSignatureAt:]) != 0xAA55 {
		return nil, nil
	}
	if hasProtectiveMBR(mbr) {
		parts, err := parseGPT(r, size)
		if err == nil {
			return parts, nil
		}
		if !errors.Is(err, errBadGPT) {
			return nil, err
		}
		// Linux: an invalid GPT behind a protective MBR yields no
		// partitions from the msdos parser either (it refuses pMBRs).
		return nil, nil
	}
	return parseMBR(r, mbr, size)
}

func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("reading partition table at %d: %w", off, err)
}

// mbrEntry is one 16-byte partition entry of an MBR or EBR.
type mbrEntry struct {
	boot    byte
	typ     byte
	start   uint32 // LBA
	sectors uint32
}

func mbrEntries(sec []byte) [4]mbrEntry {
	var e [4]mbrEntry
	for i := range e {
		b := sec[mbrTableAt+16*i : mbrTableAt+16*(i+1)]
		e[i] = mbrEntry{boot: b[0], typ: b[4],
			start: binary.LittleEndian.Uint32(b[8:]), sectors: binary.LittleEndian.Uint32(b[12:])}
	}
	return e
}

func isExtended(typ byte) bool { return typ == 0x05 || typ == 0x0f || typ == 0x85 }

func hasProtectiveMBR(mbr []byte) bool {
	for _, e := range mbrEntries(mbr) {
		if e.typ == 0xee {
			return true
		}
	}
	return false
}

// clip bounds [start, start+length) to the disk; ok is false when nothing
// of the partition lies on the disk.
func clip(start, length, size int64) (int64, bool) {
	if start < 0 || length <= 0 || start >= size {
		return 0, false
	}
	return min(length, size-start), true
}

func parseMBR(r io.ReaderAt, mbr []byte, size int64) ([]Partition, error) {
	ents := mbrEntries(mbr)
	// Linux (msdos_partition): boot indicators other than 0 and 0x80
	// mean this sector is not a partition table (e.g. a FAT boot sector).
	for _, e := range ents {
		if e.boot != 0 && e.boot != 0x80 {
			return nil, nil
		}
	}
	var parts []Partition
	add := func(num int, start, length int64) {
		if l, ok := clip(start, length, size); ok {
			parts = append(parts, Partition{Number: num, Start: start, Length: l, Scheme: "mbr"})
		}
	}
	var ext []mbrEntry
	for i, e := range ents {
		if e.sectors == 0 {
			continue
		}
		if isExtended(e.typ) {
			ext = append(ext, e)
			continue
		}
		add(i+1, int64(e.start)*sectorSize, int64(e.sectors)*sectorSize)
	}
	next := 5
	for _, e := range ext {
		var err error
		next, err = parseExtended(r, size, int64(e.start)*sectorSize, int64(e.sectors)*sectorSize, next, add)
		if err != nil {
			return nil, err
		}
	}
	return parts, nil
}

// parseExtended walks the chain of extended boot records of the extended
// partition [first, first+firstSize), as Linux's parse_extended() does:
// the data entries of each EBR are logical partitions relative to that EBR,
// its first extended entry links to the next EBR relative to the
// container. The chain is bounded in length and may not revisit an EBR.
func parseExtended(r io.ReaderAt, size, first, firstSize int64, next int, add func(int, int64, int64)) (int, error) {
	this, thisSize := first, firstSize
	sec := make([]byte, sectorSize)
	seen := map[int64]bool{}
	for range maxEBRChain {
		// A link back to an EBR already read is a loop: stop there,
		// as libblkid does (Linux would repeat partitions up to its
		// limit).
		if next > maxPartitions || this < 0 || this > size-sectorSize || seen[this] {
			return next, nil
		}
		seen[this] = true
		if err := readFull(r, sec, this); err != nil {
			return next, err
		}
		if binary.LittleEndian.Uint16(sec[mbrSignatureAt:]) != 0xAA55 {
			return next, nil
		}
		ents := mbrEntries(sec)
		for i, e := range ents {
			if e.sectors == 0 || isExtended(e.typ) {
				continue
			}
			offs, length := int64(e.start)*sectorSize, int64(e.sectors)*sectorSize
			start := this + offs
			// The 3rd and 4th entries sometimes hold garbage: Linux
			// only believes them when they fit the container.
			if i >= 2 && (offs+length > thisSize || start < first || start+length > first+firstSize) {
				continue
			}
			add(next, start, length)
			next++
			if next > maxPartitions {
				return next, nil
			}
		}
		link := -1
		for i, e := range ents {
			if e.sectors != 0 && isExtended(e.typ) {
				link = i
				break
			}
		}
		if link < 0 {
			return next, nil
		}
		this = first + int64(ents[link].start)*sectorSize
		thisSize = int64(ents[link].sectors) * sectorSize
	}
	return next, nil
}

// GPT header field offsets (UEFI spec, table "GPT Header").
const (
	gptSignature   = "EFI PART"
	gptMinHeader   = 92
	gptEntryMin    = 128
	gptEntryStart  = 32
	gptEntryEnd    = 40
	gptEntryTypeID = 0
)

// parseGPT reads the primary GPT header at LBA 1, falling back to the
// alternate header in the last sector as Linux does (find_valid_gpt).
func parseGPT(r io.ReaderAt, size int64) ([]Partition, error) {
	lastLBA := uint64(size/sectorSize) - 1
	parts, err := readGPT(r, size, 1, lastLBA)
	if err == nil || !errors.Is(err, errBadGPT) {
		return parts, err
	}
	if alt, err2 := readGPT(r, size, lastLBA, lastLBA); err2 == nil {
		return alt, nil
	}
	return nil, err
}

func readGPT(r io.ReaderAt, size int64, lba, lastLBA uint64) ([]Partition, error) {
	if lba > lastLBA {
		return nil, fmt.Errorf("%w: header LBA %d past the end", errBadGPT, lba)
	}
	hdr := make([]byte, sectorSize)
	if err := readFull(r, hdr, int64(lba)*sectorSize); err != nil {
		return nil, err
	}
	if string(hdr[:8]) != gptSignature {
		return nil, fmt.Errorf("%w: no signature at LBA %d", errBadGPT, lba)
	}
	hsize := binary.LittleEndian.Uint32(hdr[12:])
	if hsize < gptMinHeader || hsize > sectorSize {
		return nil, fmt.Errorf("%w: header size %d", errBadGPT, hsize)
	}
	want := binary.LittleEndian.Uint32(hdr[16:])
	h := make([]byte, hsize)
	copy(h, hdr[:hsize])
	clear(h[16:20])
	if crc32.ChecksumIEEE(h) != want {
		return nil, fmt.Errorf("%w: header CRC mismatch", errBadGPT)
	}
	if my := binary.LittleEndian.Uint64(hdr[24:]); my != lba {
		return nil, fmt.Errorf("%w: header at LBA %d says it is at %d", errBadGPT, lba, my)
	}
	firstUsable := binary.LittleEndian.Uint64(hdr[40:])
	lastUsable := binary.LittleEndian.Uint64(hdr[48:])
	if firstUsable > lastLBA || lastUsable > lastLBA || lastUsable < firstUsable {
		return nil, fmt.Errorf("%w: usable LBAs %d..%d outside the disk", errBadGPT, firstUsable, lastUsable)
	}
	arrayLBA := binary.LittleEndian.Uint64(hdr[72:])
	count := binary.LittleEndian.Uint32(hdr[80:])
	esize := binary.LittleEndian.Uint32(hdr[84:])
	// The entry size is 128 << n (UEFI); Linux requires exactly
	// sizeof(gpt_entry) == 128, newer specs allow larger.
	if esize < gptEntryMin || esize&(esize-1) != 0 || esize > sectorSize*8 {
		return nil, fmt.Errorf("%w: entry size %d", errBadGPT, esize)
	}
	arrayLen := uint64(count) * uint64(esize)
	if arrayLen > maxGPTArray {
		return nil, fmt.Errorf("%w: entry array of %d bytes", errBadGPT, arrayLen)
	}
	if arrayLBA > lastLBA || arrayLen > (lastLBA+1-arrayLBA)*sectorSize {
		return nil, fmt.Errorf("%w: entry array past the end of the disk", errBadGPT)
	}
	arr := make([]byte, arrayLen)
	if err := readFull(r, arr, int64(arrayLBA)*sectorSize); err != nil {
		return nil, err
	}
	if crc32.ChecksumIEEE(arr) != binary.LittleEndian.Uint32(hdr[88:]) {
		return nil, fmt.Errorf("%w: entry array CRC mismatch", errBadGPT)
	}
	var parts []Partition
	for i := range min(int(count), maxPartitions) {
		e := arr[i*int(esize) : (i+1)*int(esize)]
		if allZero(e[gptEntryTypeID : gptEntryTypeID+16]) {
			continue
		}
		first := binary.LittleEndian.Uint64(e[gptEntryStart:])
		last := binary.LittleEndian.Uint64(e[gptEntryEnd:])
		// Linux's is_pte_valid(): both ends on the disk.
		if first > lastLBA || last > lastLBA || last < first {
			continue
		}
		start, length := int64(first)*sectorSize, int64(last-first+1)*sectorSize
		if l, ok := clip(start, length, size); ok {
			parts = append(parts, Partition{Number: i + 1, Start: start, Length: l, Scheme: "gpt"})
		}
	}
	return parts, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
