package nbdserver

import (
	"bytes"
	"context"
	"testing"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
)

// TestClientReadBatch: reads sent together come back as ReadAt reads
// them, with every reply mode, and bad batches are refused before
// anything is sent.
func TestClientReadBatch(t *testing.T) {
	img, _ := chainImage(t)
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img}}})
	for _, opts := range []nbdclient.Options{{}, {StructuredReplies: true}, {ExtendedHeaders: true}} {
		c, err := nbdclient.Dial(context.Background(), uri, opts)
		if err != nil {
			t.Fatal(err)
		}
		var reqs []nbdclient.ReadRequest
		for i, off := range []int64{0, 64 << 10, 128 << 10, 1 << 20, 2 << 20, 4 << 20, 7<<20 + 512, 8<<20 - 4096} {
			reqs = append(reqs, nbdclient.ReadRequest{P: make([]byte, 4096+i*(64<<10)%(1<<20)), Off: off})
		}
		reqs[len(reqs)-1].P = reqs[len(reqs)-1].P[:4096]
		if err := c.ReadBatch(reqs); err != nil {
			t.Fatalf("%+v: %v", opts, err)
		}
		for _, r := range reqs {
			want := make([]byte, len(r.P))
			if _, err := img.ReadAt(want, r.Off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(r.P, want) {
				t.Errorf("%+v: read of %d at %d differs", opts, len(r.P), r.Off)
			}
		}
		if err := c.ReadBatch([]nbdclient.ReadRequest{{P: make([]byte, 8192), Off: 8<<20 - 4096}}); err == nil {
			t.Errorf("%+v: read past the end accepted", opts)
		}
		if err := c.ReadBatch(make([]nbdclient.ReadRequest, nbdclient.MaxBatch+1)); err == nil {
			t.Errorf("%+v: batch of %d accepted", opts, nbdclient.MaxBatch+1)
		}
		// The connection is still in step.
		p := make([]byte, 512)
		if _, err := c.ReadAt(p, 64<<10); err != nil || p[0] != 2 {
			t.Errorf("%+v: after the batches: %v %d", opts, err, p[0])
		}
		c.Close()
	}
}
