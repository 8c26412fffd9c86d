package nbdserver

import (
	"context"
	"sync"
	"testing"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
)

// BenchmarkWritableRead reads a fully written 64 MiB writable export in
// 256 KiB requests (no sendfile on writable exports).
func BenchmarkWritableRead(b *testing.B) { benchRead(b, true) }

// BenchmarkReadOnlyRead is the same export served read-only (sendfile).
func BenchmarkReadOnlyRead(b *testing.B) { benchRead(b, false) }

func benchRead(b *testing.B, writable bool) {
	img, _ := writableImage(b, "64M")
	buf := make([]byte, 64<<20)
	for i := range buf {
		buf[i] = byte(i>>12) | 1
	}
	if _, err := img.WriteAt(buf, 0); err != nil {
		b.Fatal(err)
	}
	_, uri := startServer(b, Config{Exports: []*Export{{Image: img, Writable: writable}}})
	c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: true})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	p := make([]byte, 256<<10)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	for range b.N {
		for off := int64(0); off < int64(len(buf)); off += int64(len(p)) {
			if _, err := c.ReadAt(p, off); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkWrite writes a 64 MiB export in 1 MiB requests.
func BenchmarkWrite(b *testing.B) {
	img, _ := writableImage(b, "64M")
	_, uri := startServer(b, Config{Exports: []*Export{{Image: img, Writable: true}}})
	c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: true})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	p := make([]byte, 1<<20)
	b.SetBytes(64 << 20)
	b.ResetTimer()
	for range b.N {
		for off := int64(0); off < 64<<20; off += int64(len(p)) {
			if _, err := c.WriteAt(p, off); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkRandWrite4K overwrites random 4 KiB blocks of an allocated
// 64 MiB export from 16 connections (queue depth 16).
func BenchmarkRandWrite4K(b *testing.B) {
	img, _ := writableImage(b, "64M")
	if err := img.WriteZeroes(0, 64<<20, 0); err != nil {
		b.Fatal(err)
	}
	if _, err := img.WriteAt(make([]byte, 64<<20), 0); err != nil {
		b.Fatal(err)
	}
	_, uri := startServer(b, Config{Exports: []*Export{{Image: img, Writable: true}}})
	const conns = 16
	cs := make([]*nbdclient.Client, conns)
	for i := range cs {
		c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: true})
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		cs[i] = c
	}
	b.SetBytes(4096)
	b.ResetTimer()
	var wg sync.WaitGroup
	for i, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 4096)
			x := uint64(i + 1)
			for range b.N / conns {
				x = x*6364136223846793005 + 1442695040888963407
				if _, err := c.WriteAt(p, int64(x>>40)%(64<<20/4096)*4096); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}
