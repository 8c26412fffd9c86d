package integration

// TLS of nbdgw serve with certificates made at test time as QEMU's
// documentation makes them (certtool, RSA) and with OpenSSL (ECDSA),
// against GnuTLS clients (nbdinfo, nbdcopy, qemu-img, qemu-io,
// nbd-client), the Go client and an OpenSSL client (Python's ssl), in
// TLS 1.2 and 1.3, with and without client certificates; and broken
// credentials refused at start, as qemu-nbd refuses them.

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// tlsRun runs a command that must succeed while making credentials.
func tlsRun(t testing.TB, name string, args ...string) {
	t.Helper()
	if r := hardExec(60*time.Second, name, args...); r.code != 0 {
		t.Fatalf("%s", r)
	}
}

// tlsCerttool makes dir/ca-cert.pem, server-*.pem and (client true)
// client-*.pem with certtool, as QEMU's docs/system/tls.rst shows (RSA
// keys from certtool --generate-privkey). serverExtra is added to the
// server template (for example expiration dates).
func tlsCerttool(t testing.TB, dir string, client bool, serverExtra string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	tpl := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	f := func(name string) string { return filepath.Join(dir, name) }
	key := func(name string) {
		r := hardExec(60*time.Second, "certtool", "--generate-privkey", "--outfile", f(name))
		if r.code != 0 {
			t.Fatal(r)
		}
	}
	key("ca-key.pem")
	tlsRun(t, "certtool", "--generate-self-signed", "--load-privkey", f("ca-key.pem"),
		"--template", tpl("ca.info", "cn = Name of your organization\nca\ncert_signing_key\n"), "--outfile", f("ca-cert.pem"))
	key("server-key.pem")
	tlsRun(t, "certtool", "--generate-certificate", "--load-ca-certificate", f("ca-cert.pem"), "--load-ca-privkey", f("ca-key.pem"),
		"--load-privkey", f("server-key.pem"), "--outfile", f("server-cert.pem"),
		"--template", tpl("server.info", "organization = Name of your organization\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n"+serverExtra))
	if client {
		key("client-key.pem")
		tlsRun(t, "certtool", "--generate-certificate", "--load-ca-certificate", f("ca-cert.pem"), "--load-ca-privkey", f("ca-key.pem"),
			"--load-privkey", f("client-key.pem"), "--outfile", f("client-cert.pem"),
			"--template", tpl("client.info", "country = GB\norganization = Name of your organization\ncn = client.foo.example.com\ntls_www_client\nencryption_key\nsigning_key\n"))
	}
}

// tlsOpenSSL makes the same layout with openssl and ECDSA P-256 keys.
func tlsOpenSSL(t testing.TB, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f := func(name string) string { return filepath.Join(dir, name) }
	tlsRun(t, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30",
		"-subj", "/CN=Test CA", "-keyout", f("ca-key.pem"), "-out", f("ca-cert.pem"),
		"-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
	for _, leaf := range []struct{ name, cn, ext string }{
		{"server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"},
		{"client", "client", "extendedKeyUsage=clientAuth\n"},
	} {
		ext := f(leaf.name + ".ext")
		if err := os.WriteFile(ext, []byte(leaf.ext), 0o644); err != nil {
			t.Fatal(err)
		}
		tlsRun(t, "openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN="+leaf.cn,
			"-keyout", f(leaf.name+"-key.pem"), "-out", f(leaf.name+".csr"))
		tlsRun(t, "openssl", "x509", "-req", "-in", f(leaf.name+".csr"), "-CA", f("ca-cert.pem"), "-CAkey", f("ca-key.pem"),
			"-CAcreateserial", "-days", "30", "-extfile", ext, "-out", f(leaf.name+"-cert.pem"))
	}
}

// tlsCAOnly copies dir's CA into a new directory without client
// credentials.
func tlsCAOnly(t testing.TB, dir string) string {
	t.Helper()
	out := t.TempDir()
	b, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(out, "ca-cert.pem"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

// tlsPyClient is an OpenSSL client (Python's ssl module): NBD_OPT_STARTTLS,
// the TLS handshake at the given version, then NBD_OPT_LIST; it prints
// the TLS version and the export names.
const tlsPyClient = `
import socket, ssl, struct, sys
path, cadir, version, withcert = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(path)
def recvn(sock, n):
    b = b""
    while len(b) < n:
        c = sock.recv(n - len(b))
        if not c: raise SystemExit("EOF")
        b += c
    return b
hello = recvn(s, 18)
assert hello[:16] == b"NBDMAGICIHAVEOPT", hello
s.sendall(struct.pack(">I", 3))
def opt(sock, o, data=b""):
    sock.sendall(b"IHAVEOPT" + struct.pack(">II", o, len(data)) + data)
def reply(sock):
    h = recvn(sock, 20)
    magic, o, typ, n = struct.unpack(">QIII", h)
    return typ, recvn(sock, n)
opt(s, 5)
typ, _ = reply(s)
assert typ == 1, typ
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(cadir + "/ca-cert.pem")
v = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
ctx.minimum_version = ctx.maximum_version = v
if withcert:
    ctx.load_cert_chain(cadir + "/client-cert.pem", cadir + "/client-key.pem")
t = ctx.wrap_socket(s, server_hostname="localhost")
opt(t, 3)
names = []
while True:
    typ, d = reply(t)
    if typ == 2:
        n = struct.unpack(">I", d[:4])[0]
        names.append(d[4:4+n].decode())
    else:
        assert typ == 1, hex(typ)
        break
opt(t, 2)
print(t.version(), names)
`

// TestTLSClients: every client against RSA (certtool) and ECDSA
// (openssl) credentials, with client certificates required (the
// default, as qemu-nbd's verify-peer=on) and with --tls-verify-peer=false.
func TestTLSClients(t *testing.T) {
	hardRequire(t, "certtool", "openssl", "python3", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "nbd-client")
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	tlsRun(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
	tlsRun(t, "qemu-io", "-c", "write -q -P 0x5a 0 1M", img)
	want := hardQemuRaw(t, img)
	py := filepath.Join(dir, "client.py")
	if err := os.WriteFile(py, []byte(tlsPyClient), 0o644); err != nil {
		t.Fatal(err)
	}
	rsa, ecdsa := filepath.Join(dir, "rsa"), filepath.Join(dir, "ecdsa")
	tlsCerttool(t, rsa, true, "")
	tlsOpenSSL(t, ecdsa)

	for _, creds := range []string{rsa, ecdsa} {
		caOnly := tlsCAOnly(t, creds)
		for _, verify := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/verify-peer=%v", filepath.Base(creds), verify), func(t *testing.T) {
				s := admStart(t, true, admFreePort(t), img, "--tls-creds", creds, "--tls-required", fmt.Sprintf("--tls-verify-peer=%v", verify))
				unix := admStart(t, true, "", img, "--tls-creds", creds, "--tls-required", fmt.Sprintf("--tls-verify-peer=%v", verify))
				// Clients that present a certificate, and (verify-peer off)
				// clients that do not.
				clientDirs := []string{creds}
				if !verify {
					clientDirs = append(clientDirs, caOnly)
				}
				for _, cd := range clientDirs {
					who := "with a client certificate"
					if cd == caOnly {
						who = "without a client certificate"
					}
					uri := "nbds://localhost:" + strings.Split(s.addr, ":")[1] + "/?tls-certificates=" + cd
					if r := hardExec(30*time.Second, "nbdinfo", "--size", uri); r.code != 0 || strings.TrimSpace(string(r.stdout)) != "4194304" {
						t.Errorf("nbdinfo %s: %s", who, r)
					}
					if r := hardExec(30*time.Second, "nbdcopy", uri, "-"); r.code != 0 || !bytes.Equal(r.stdout, want) {
						t.Errorf("nbdcopy %s: %s (equal %v)", who, r, bytes.Equal(r.stdout, want))
					}
					for _, pri := range []string{"NORMAL", "NORMAL:-VERS-TLS1.3"} {
						obj := "tls-creds-x509,id=tls0,endpoint=client,dir=" + cd + ",priority=" + pri
						opts := "driver=nbd,host=127.0.0.1,port=" + strings.Split(s.addr, ":")[1] + ",tls-creds=tls0,tls-hostname=localhost"
						if r := hardExec(30*time.Second, "qemu-img", "info", "--object", obj, "--image-opts", opts); r.code != 0 {
							t.Errorf("qemu-img info %s, priority %s: %s", who, pri, r)
						}
						r := hardExec(30*time.Second, "qemu-io", "-r", "--object", obj, "--image-opts", opts, "-c", "read -P 0x5a 0 64k")
						if r.code != 0 || !strings.Contains(string(r.stdout), "read 65536/65536") {
							t.Errorf("qemu-io %s, priority %s: %s\n%s", who, pri, r, r.stdout)
						}
					}
					nbdc := []string{"-l", "127.0.0.1", strings.Split(s.addr, ":")[1], "-cacertfile", filepath.Join(cd, "ca-cert.pem"), "-tlshostname", "localhost", "-enable-tls"}
					if cd == creds {
						nbdc = append(nbdc, "-certfile", filepath.Join(cd, "client-cert.pem"), "-keyfile", filepath.Join(cd, "client-key.pem"))
					}
					if r := hardExec(30*time.Second, "nbd-client", nbdc...); r.code != 0 {
						t.Errorf("nbd-client -l %s: %s", who, r)
					}
					for _, v := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
						cfg, err := nbdproto.LoadClientTLS(cd)
						if err != nil {
							t.Fatal(err)
						}
						cfg.ServerName, cfg.MinVersion, cfg.MaxVersion = "localhost", v, v
						c, err := nbdclient.Dial(context.Background(), unix.uri(), nbdclient.Options{TLS: cfg, StructuredReplies: true})
						if err != nil {
							t.Errorf("Go client %s, TLS %x: %v", who, v, err)
							continue
						}
						buf := make([]byte, 4096)
						if _, err := c.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, want[:4096]) {
							t.Errorf("Go client %s, TLS %x: read %v", who, v, err)
						}
						c.Close()
						withCert := "0"
						if cd == creds {
							withCert = "1"
						}
						r := hardExec(30*time.Second, "python3", py, unix.addr, cd, map[uint16]string{tls.VersionTLS12: "1.2", tls.VersionTLS13: "1.3"}[v], withCert)
						wantV := map[uint16]string{tls.VersionTLS12: "TLSv1.2", tls.VersionTLS13: "TLSv1.3"}[v]
						if r.code != 0 || !strings.HasPrefix(string(r.stdout), wantV) {
							t.Errorf("OpenSSL client %s, %s: %s\n%s", who, wantV, r, r.stdout)
						}
					}
				}
				if verify {
					// No client certificate: refused, by GnuTLS and Go clients.
					uri := "nbds://localhost:" + strings.Split(s.addr, ":")[1] + "/?tls-certificates=" + caOnly
					if r := hardExec(30*time.Second, "nbdinfo", "--size", uri); r.code == 0 {
						t.Errorf("nbdinfo without a client certificate was let in")
					}
				}
				for _, p := range []*admServer{s, unix} {
					r := p.proc.stop(t)
					hardSane(t, r)
					if verify && bytes.Contains(r.stderr, []byte("handshake")) && !bytes.Contains(r.stderr, []byte("didn't provide a certificate")) {
						t.Errorf("server log:\n%s", hardClip(r.stderr))
					}
				}
			})
		}
	}
}

// TestTLSCredentialsChecked: broken credentials stop nbdgw serve at
// start with one line naming the problem, where qemu-nbd refuses them
// too (the oracle): an expired server certificate, one not yet valid, a
// key that is not the certificate's, a certificate from another CA, and
// a missing file.
func TestTLSCredentialsChecked(t *testing.T) {
	hardRequire(t, "certtool", "qemu-img", "qemu-nbd")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	tlsRun(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	good, other := filepath.Join(dir, "good"), filepath.Join(dir, "other")
	tlsCerttool(t, good, false, "")
	tlsCerttool(t, other, false, "")
	copyDir := func(name string, from string) string {
		d := filepath.Join(dir, name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, f := range []string{"ca-cert.pem", "server-cert.pem", "server-key.pem"} {
			b, err := os.ReadFile(filepath.Join(from, f))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(d, f), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return d
	}
	expired := filepath.Join(dir, "expired")
	tlsCerttool(t, expired, false, "activation_date = \"2001-01-01 00:00:00 UTC\"\nexpiration_date = \"2002-01-01 00:00:00 UTC\"\n")
	future := filepath.Join(dir, "future")
	tlsCerttool(t, future, false, "activation_date = \"2099-01-01 00:00:00 UTC\"\nexpiration_date = \"2100-01-01 00:00:00 UTC\"\n")
	mismatch := copyDir("mismatch", good)
	if b, err := os.ReadFile(filepath.Join(other, "server-key.pem")); err != nil || os.WriteFile(filepath.Join(mismatch, "server-key.pem"), b, 0o644) != nil {
		t.Fatal(err)
	}
	foreign := copyDir("foreign", good)
	if b, err := os.ReadFile(filepath.Join(other, "ca-cert.pem")); err != nil || os.WriteFile(filepath.Join(foreign, "ca-cert.pem"), b, 0o644) != nil {
		t.Fatal(err)
	}
	missing := copyDir("missing", good)
	os.Remove(filepath.Join(missing, "server-key.pem"))

	for _, c := range []struct {
		dir, want string
	}{
		{expired, "expired"},
		{future, "not yet active"},
		{mismatch, "private key does not match"},
		{foreign, "not signed by the CA"},
		{missing, "server-key.pem"},
	} {
		q := hardExec(10*time.Second, "qemu-nbd", "-r", "-k", filepath.Join(t.TempDir(), "q"),
			"--object", "tls-creds-x509,id=tls0,endpoint=server,dir="+c.dir, "--tls-creds", "tls0", img)
		r := hardExec(10*time.Second, bin, "serve", "--socket", filepath.Join(t.TempDir(), "s"), "--tls-creds", c.dir, img)
		t.Logf("%s: qemu-nbd: %s| nbdgw: %s", filepath.Base(c.dir), strings.TrimSpace(string(q.stderr)), strings.TrimSpace(string(r.stderr)))
		if q.code == 0 || q.timedOut {
			t.Errorf("%s: qemu-nbd accepted the credentials (the oracle disagrees with the test): %s", c.dir, q)
		}
		if r.code != 1 || r.timedOut || !strings.Contains(string(r.stderr), c.want) || strings.Count(strings.TrimSpace(string(r.stderr)), "\n") != 0 {
			t.Errorf("%s: nbdgw serve: want exit 1 and one line with %q: %s", filepath.Base(c.dir), c.want, r)
		}
	}
	// The good ones start.
	s := admStart(t, true, "", img, "--tls-creds", good)
	hardSane(t, s.proc.stop(t))
}
