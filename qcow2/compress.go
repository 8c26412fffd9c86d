package qcow2

import (
	"bytes"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// Decoders are reused; each is used by one goroutine at a time.
var (
	flatePool = sync.Pool{New: func() any { return flate.NewReader(bytes.NewReader(nil)) }}
	zstdPool  = sync.Pool{New: func() any {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxMemory(64<<20), zstd.WithDecoderLowmem(true))
		if err != nil {
			return err
		}
		return d
	}}
)

// decompress inflates one compressed cluster into out, which must be filled
// exactly: QEMU's qcow2_zlib_decompress() (raw deflate) and
// qcow2_zstd_decompress() (zstd frames, streaming). Input past the end of
// the compressed data (the sector padding, or the next cluster's bytes) is
// never read as long as out is full first.
func decompress(t CompressionType, in, out []byte) error {
	var r io.Reader
	switch t {
	case CompressionZlib:
		fr := flatePool.Get().(io.ReadCloser)
		defer flatePool.Put(fr)
		if err := fr.(flate.Resetter).Reset(bytes.NewReader(in), nil); err != nil {
			return err
		}
		r = fr
	case CompressionZstd:
		v := zstdPool.Get()
		d, ok := v.(*zstd.Decoder)
		if !ok {
			return fmt.Errorf("zstd decoder: %v", v)
		}
		defer zstdPool.Put(d)
		if err := d.Reset(bytes.NewReader(in)); err != nil {
			return err
		}
		r = d
	default:
		return fmt.Errorf("unknown compression type %d", t)
	}
	if _, err := io.ReadFull(r, out); err != nil {
		return fmt.Errorf("decompressing: %w", err)
	}
	return nil
}
