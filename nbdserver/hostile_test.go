package nbdserver

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// TestHostileClients runs misbehaving clients against the server while a
// well-behaved client keeps reading and mapping; the good client must
// never see an error or wrong data, and the server must keep accepting.
func TestHostileClients(t *testing.T) {
	img := rawImage(t, 4<<20)
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img}}, Logf: func(string, ...any) {}})
	u, _ := nbdproto.ParseURI(uri)
	want := make([]byte, img.Size())
	img.ReadAt(want, 0)

	stop := make(chan struct{})
	var reads atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{ExtendedHeaders: true, MetaContexts: []string{metactx.BaseAllocation}})
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		buf := make([]byte, 256<<10)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			off := int64(i%16) * int64(len(buf))
			if _, err := c.ReadAt(buf, off); err != nil || !bytes.Equal(buf, want[off:off+int64(len(buf))]) {
				t.Errorf("good client read at %d: %v", off, err)
				return
			}
			if err := c.BlockStatus(context.Background(), metactx.BaseAllocation, 0, c.Size(), func(_, _ int64, _ uint32) error { return nil }); err != nil {
				t.Errorf("good client block status: %v", err)
				return
			}
			reads.Add(1)
		}
	}()

	greeting := be.AppendUint32(nil, nbdproto.ClientFixedNewstyle|nbdproto.ClientNoZeroes)
	goExt := append(nbdproto.OptHeader{Opt: nbdproto.OptExtendedHeaders}.Append(nil), nbdproto.OptHeader{Opt: nbdproto.OptGo, Length: 6}.Append(nil)...)
	goExt = append(goExt, 0, 0, 0, 0, 0, 0)
	transmit := func(b ...[]byte) []byte {
		out := append(append([]byte{}, greeting...), goExt...)
		for _, x := range b {
			out = append(out, x...)
		}
		return out
	}
	rng := rand.New(rand.NewPCG(1, 2))
	garbage := make([]byte, 4096)
	for i := range garbage {
		garbage[i] = byte(rng.Uint32())
	}
	hostile := map[string][]byte{
		"garbage":                  garbage,
		"bad option magic":         append(append([]byte{}, greeting...), garbage[:64]...),
		"huge option":              append(append([]byte{}, greeting...), nbdproto.OptHeader{Opt: nbdproto.OptInfo, Length: 0xffffffff}.Append(nil)...),
		"huge export name":         append(append([]byte{}, greeting...), nbdproto.OptHeader{Opt: nbdproto.OptExportName, Length: 1 << 30}.Append(nil)...),
		"unknown client flags":     be.AppendUint32(nil, 0xff),
		"bad request magic":        transmit(garbage[:32]),
		"huge write":               transmit(nbdproto.Request{Type: nbdproto.CmdWrite, Length: 1 << 40}.Append(nil, true)),
		"huge read":                transmit(nbdproto.Request{Type: nbdproto.CmdRead, Length: 1 << 40}.Append(nil, true)),
		"huge status payload":      transmit(nbdproto.Request{Type: nbdproto.CmdBlockStatus, Flags: nbdproto.CmdFlagPayloadLen, Length: 1 << 30}.Append(nil, true)),
		"huge payload on flush":    transmit(nbdproto.Request{Type: nbdproto.CmdFlush, Flags: nbdproto.CmdFlagPayloadLen, Length: 1 << 40}.Append(nil, true)),
		"unknown commands":         transmit(nbdproto.Request{Type: 99}.Append(nil, true), nbdproto.Request{Type: 0xffff, Flags: 0xffff}.Append(nil, true)),
		"half a header":            transmit(nbdproto.Request{Type: nbdproto.CmdRead, Length: 512}.Append(nil, true)[:20]),
		"half a write":             transmit(nbdproto.Request{Type: nbdproto.CmdWrite, Length: 1 << 20}.Append(nil, true), garbage),
		"disconnect with reads":    transmit(bytes.Repeat(nbdproto.Request{Type: nbdproto.CmdRead, Length: 1 << 20}.Append(nil, true), 64)),
		"disconnect mid-handshake": greeting[:2],
	}
	for round := 0; round < 3; round++ {
		for name, b := range hostile {
			c, err := net.Dial(u.Network, u.Address)
			if err != nil {
				t.Fatalf("%s: dial: %v", name, err)
			}
			go func() { // drain whatever the server answers
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				buf := make([]byte, 64<<10)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
				}
			}()
			c.Write(b)
			if round == 2 {
				time.Sleep(5 * time.Millisecond)
			}
			c.Close()
		}
	}
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	if reads.Load() == 0 {
		t.Error("the good client never completed a read")
	}
	// The server still serves new clients.
	c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: true})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}
