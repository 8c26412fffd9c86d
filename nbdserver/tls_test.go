package nbdserver

import (
	"context"
	"errors"
	"testing"

	"github.com/nbdgw/nbdgw/internal/metactx"
	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
	"github.com/nbdgw/nbdgw/nbdserver/testcerts"
)

// TestTLS connects over TLS with a client certificate (verify-peer) and
// without one (verify-peer off), checks that a client without a
// certificate is refused by default, and that a TLS-only server refuses
// everything before STARTTLS.
func TestTLS(t *testing.T) {
	withClient, caOnly := t.TempDir(), t.TempDir()
	if err := testcerts.Write(withClient, true); err != nil {
		t.Fatal(err)
	}
	if err := testcerts.Write(caOnly, false); err != nil {
		t.Fatal(err)
	}
	img := rawImage(t, 1<<20)
	for _, c := range []struct {
		dir        string
		verifyPeer bool
	}{{withClient, true}, {caOnly, false}} {
		dir := c.dir
		srvTLS, err := nbdproto.LoadServerTLS(dir, c.verifyPeer)
		if err != nil {
			t.Fatal(err)
		}
		_, uri := startServer(t, Config{Exports: []*Export{{Image: img}}, TLS: srvTLS, TLSRequired: true})

		c, err := nbdclient.Dial(context.Background(), "nbds+unix:///?tls-hostname=localhost&tls-certificates="+dir+"&socket="+uri[len("nbd+unix:///?socket="):],
			nbdclient.Options{ExtendedHeaders: true, MetaContexts: []string{metactx.BaseAllocation}})
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		buf := make([]byte, 4096)
		if _, err := c.ReadAt(buf, 0); err != nil || buf[0] != 1 {
			t.Errorf("TLS read: %v %x", err, buf[:4])
		}
		c.Close()

		_, err = nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: true})
		var se *nbdproto.ServerError
		if !errors.As(err, &se) || se.Reply != nbdproto.RepErrTLSReqd {
			t.Errorf("plain client on TLS-only server: %v", err)
		}
		rc := dialRaw(t, uri)
		for _, opt := range []nbdproto.Option{nbdproto.OptList, nbdproto.OptInfo, nbdproto.OptGo, nbdproto.OptStructuredReply} {
			if got := rc.final(opt, nil); got != nbdproto.RepErrTLSReqd {
				t.Errorf("%v before STARTTLS: %v", opt, got)
			}
		}
	}
	// By default (verify-peer, as qemu-nbd) a client without a
	// certificate is refused.
	srvTLS, err := nbdproto.LoadServerTLS(withClient, true)
	if err != nil {
		t.Fatal(err)
	}
	_, uri := startServer(t, Config{Exports: []*Export{{Image: img}}, TLS: srvTLS})
	noCert, err := nbdproto.LoadClientTLS(caOnly)
	if err != nil {
		t.Fatal(err)
	}
	noCert.InsecureSkipVerify = true // caOnly's CA is not the server's: only the server's check is tested
	if _, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{TLS: noCert}); err == nil {
		t.Error("client without a certificate accepted with verify-peer")
	}
	// A client certificate from another CA is refused, verify-peer or not.
	other := t.TempDir()
	if err := testcerts.Write(other, true); err != nil {
		t.Fatal(err)
	}
	srvTLS, err = nbdproto.LoadServerTLS(caOnly, false)
	if err != nil {
		t.Fatal(err)
	}
	_, uri = startServer(t, Config{Exports: []*Export{{Image: img}}, TLS: srvTLS})
	cliTLS, err := nbdproto.LoadClientTLS(other)
	if err != nil {
		t.Fatal(err)
	}
	cliTLS.InsecureSkipVerify = true // only the server's check is tested
	if _, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{TLS: cliTLS}); err == nil {
		t.Error("client certificate from a foreign CA accepted")
	}
}
