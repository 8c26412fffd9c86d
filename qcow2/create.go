package qcow2

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
)

// CreateOptions describe a new qcow2 image.
type CreateOptions struct {
	Size          int64  // virtual size (rounded up to 512 bytes)
	ClusterBits   uint32 // 0: 16 (64 KiB)
	BackingFile   string // name stored in the header, "" for none
	BackingFormat string // "qcow2" or "raw" when BackingFile is set
	ExtendedL2    bool   // extended L2 entries (32 subclusters a cluster; clusters of 16 KiB at least)
}

// Create writes a new, empty qcow2 v3 image at path (which must not
// exist): header, one refcount table cluster, one refcount block, the L1
// table. The layout is what qemu-img create makes.
func Create(path string, o CreateOptions) error {
	cbits := o.ClusterBits
	if cbits == 0 {
		cbits = 16
	}
	if cbits < minClusterBits || cbits > maxClusterBits {
		return fmt.Errorf("qcow2: cluster size 2^%d out of range", cbits)
	}
	if o.ExtendedL2 && cbits < 14 {
		return fmt.Errorf("qcow2: extended L2 entries need clusters of 16 KiB at least, not %d bytes", int64(1)<<cbits)
	}
	cs := int64(1) << cbits
	size := (o.Size + 511) &^ 511
	l2Entry := int64(8)
	if o.ExtendedL2 {
		l2Entry = 16
	}
	l2Cover := cs * (cs / l2Entry)
	l1Entries := (size + l2Cover - 1) / l2Cover
	l1Clusters := (l1Entries*8 + cs - 1) / cs // none for an empty image, as qemu-img makes it
	if l1Entries*8 > maxL1Bytes {
		return fmt.Errorf("qcow2: virtual size %d too large for cluster size %d", size, cs)
	}
	const headerLen = 112   // v3 header with the compression type field, padded
	total := 3 + l1Clusters // header, refcount table, refcount block, L1
	if total > cs*8/16 {
		return fmt.Errorf("qcow2: L1 table too large for one refcount block")
	}
	buf := make([]byte, total*cs)
	be := binary.BigEndian
	h := buf[:cs]
	be.PutUint32(h[0:], Magic)
	be.PutUint32(h[4:], 3)
	be.PutUint32(h[20:], cbits)
	be.PutUint64(h[24:], uint64(size))
	be.PutUint32(h[36:], uint32(l1Entries))
	if l1Entries > 0 {
		be.PutUint64(h[40:], uint64(3*cs))
	}
	be.PutUint64(h[48:], uint64(cs))
	be.PutUint32(h[56:], 1)
	if o.ExtendedL2 {
		be.PutUint64(h[72:], IncompatExtendedL2)
	}
	be.PutUint32(h[96:], 4) // 16-bit refcounts
	be.PutUint32(h[100:], headerLen)
	ext := headerLen
	if o.BackingFile != "" {
		if len(o.BackingFile) > maxBackingName {
			return fmt.Errorf("qcow2: backing file name too long")
		}
		be.PutUint32(h[ext:], extBackingFormat)
		be.PutUint32(h[ext+4:], uint32(len(o.BackingFormat)))
		copy(h[ext+8:], o.BackingFormat)
		ext += 8 + (len(o.BackingFormat)+7)&^7
	}
	ext += 8 // end of extensions
	if o.BackingFile != "" {
		be.PutUint64(h[8:], uint64(ext))
		be.PutUint32(h[16:], uint32(len(o.BackingFile)))
		copy(h[ext:], o.BackingFile)
	}
	be.PutUint64(buf[cs:], uint64(2*cs)) // refcount table -> block
	for c := int64(0); c < total; c++ {  // block: every metadata cluster used once
		be.PutUint16(buf[2*cs+c*2:], 1)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(buf); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// openSnapshot opens the chain at path read-only under a temporary qcow2
// overlay that takes the writes. The overlay is unlinked once open, so it
// disappears with the process whatever way it ends.
func openSnapshot(path string, opts Options) (*Image, error) {
	ro := opts
	ro.Snapshot, ro.Writable, ro.snapshotBase = false, false, true
	base, err := Open(path, ro)
	if err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		base.Close()
		return nil, err
	}
	dir, err := os.MkdirTemp("", "nbdgw-snapshot-")
	if err != nil {
		base.Close()
		return nil, err
	}
	defer os.RemoveAll(dir)
	ov := filepath.Join(dir, "overlay.qcow2")
	err = Create(ov, CreateOptions{Size: base.Size(), BackingFile: abs, BackingFormat: base.layers[0].info().Format})
	if err != nil {
		base.Close()
		return nil, err
	}
	l, _, _, err := openLayer(ov, "qcow2", 1, true, roleTop, base.warn)
	if err != nil {
		base.Close()
		return nil, err
	}
	img := &Image{mu: base.mu, warn: base.warn, layers: append([]layer{l}, base.layers...)}
	for i, bl := range base.layers {
		setDepth(bl, i+2)
	}
	if err := img.startWriting(); err != nil {
		img.Close()
		return nil, err
	}
	return img, nil
}

// setDepth renumbers a layer placed under a snapshot overlay.
func setDepth(l layer, depth int) {
	switch v := l.(type) {
	case *qcow2Layer:
		v.depth = depth
	case *rawLayer:
		v.depth = depth
	}
}
