package nbdserver

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// lookupCounter is a Config.Lookup that counts uses of one export.
type lookupCounter struct {
	exp *Export

	mu                 sync.Mutex
	acquired, released int
}

func (l *lookupCounter) lookup(name string) (*Export, func(), error) {
	if name != l.exp.Name {
		return nil, nil, fmt.Errorf("export %q not available here", name)
	}
	l.mu.Lock()
	l.acquired++
	l.mu.Unlock()
	return l.exp, func() {
		l.mu.Lock()
		l.released++
		l.mu.Unlock()
	}, nil
}

func (l *lookupCounter) counts() (int, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.acquired, l.released
}

// waitReleased waits until released reaches want (the server releases
// after the connection's goroutine sees the disconnect).
func (l *lookupCounter) waitReleased(t *testing.T, want int) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if _, r := l.counts(); r == want {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	a, r := l.counts()
	t.Fatalf("acquired %d, released %d; want %d released", a, r, want)
}

func TestLookupAndList(t *testing.T) {
	static := &Export{Name: "static", Description: "the static one", Image: rawImage(t, 1<<20)}
	lc := &lookupCounter{exp: &Export{Name: "dyn", Description: "looked up", Image: rawImage(t, 2<<20)}}
	_, uri := startServer(t, Config{
		Exports: []*Export{static},
		Lookup:  lc.lookup,
		List: func() []ExportInfo {
			return []ExportInfo{{Name: "dyn"}, {Name: "static", Description: "shadowed"}}
		},
	})

	// LIST: Exports first, then List without the names Exports has.
	rc := dialRaw(t, uri)
	replies, payloads := rc.option(nbdproto.OptList, nil)
	var got []string
	for i, r := range replies {
		if r.Type == nbdproto.RepServer {
			n := be.Uint32(payloads[i])
			got = append(got, string(payloads[i][4:4+n])+"|"+string(payloads[i][4+n:]))
		}
	}
	if want := "static|the static one,dyn|"; strings.Join(got, ",") != want {
		t.Errorf("NBD_OPT_LIST: %q, want %q", strings.Join(got, ","), want)
	}

	// INFO of the looked-up export, then GO of the static one: the
	// looked-up export is released at the end of the handshake.
	if r := rc.final(nbdproto.OptInfo, nbdproto.InfoRequest{Export: "dyn"}.Append(nil)); r != nbdproto.RepAck {
		t.Fatalf("NBD_OPT_INFO dyn: %v", r)
	}
	if r := rc.final(nbdproto.OptInfo, nbdproto.InfoRequest{Export: "dyn"}.Append(nil)); r != nbdproto.RepAck {
		t.Fatalf("second NBD_OPT_INFO dyn: %v", r)
	}
	if a, _ := lc.counts(); a != 1 {
		t.Errorf("two INFOs on one connection looked up %d times, want 1", a)
	}
	if r := rc.final(nbdproto.OptInfo, nbdproto.InfoRequest{Export: "other"}.Append(nil)); r != nbdproto.RepErrUnknown {
		t.Errorf("NBD_OPT_INFO of a name Lookup refuses: %v, want NBD_REP_ERR_UNKNOWN", r)
	}
	rc.goExport()
	lc.waitReleased(t, 1)

	// Two clients of the looked-up export: each holds it until it leaves.
	c1, err := nbdclient.Dial(context.Background(), strings.Replace(uri, ":///", ":///dyn", 1), nbdclient.Options{StructuredReplies: true})
	if err != nil {
		t.Fatal(err)
	}
	c2, err := nbdclient.Dial(context.Background(), strings.Replace(uri, ":///", ":///dyn", 1), nbdclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if c1.Size() != 2<<20 || c2.Size() != 2<<20 {
		t.Errorf("sizes %d, %d", c1.Size(), c2.Size())
	}
	if a, r := lc.counts(); a != 3 || r != 1 {
		t.Errorf("with two clients: acquired %d, released %d; want 3, 1", a, r)
	}
	c1.Close()
	lc.waitReleased(t, 2)
	c2.Close()
	lc.waitReleased(t, 3)

	// GO of a name Lookup refuses is an error reply.
	_, err = nbdclient.Dial(context.Background(), strings.Replace(uri, ":///", ":///other", 1), nbdclient.Options{})
	var se *nbdproto.ServerError
	if !errors.As(err, &se) || se.Reply != nbdproto.RepErrUnknown {
		t.Errorf("GO of a refused name: %v, want NBD_REP_ERR_UNKNOWN", err)
	}
}
