package integration

// TLS-PSK of nbdgw serve --tls-psk FILE (GnuTLS through cgo, see
// internal/gnutlspsk) against the real PSK clients, qemu-img and qemu-io
// (tls-creds-psk) and nbdinfo and nbdcopy (libnbd's tls-psk-file), with
// nbdkit --tls=require --tls-psk=FILE as the reference server: every
// client must be let in or refused by nbdgw exactly as nbdkit does it.
// Keys are made by GnuTLS's psktool, as nbdkit's and QEMU's docs make them.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// pskKeys makes dir/keys.psk holding a key for each user, with psktool.
func pskKeys(t testing.TB, dir string, users ...string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "keys.psk")
	for _, u := range users {
		tlsRun(t, "psktool", "-u", u, "-p", p)
	}
	return p
}

// pskClient is one client run against a server.
type pskClient struct {
	name string
	ok   bool // let in
	run  func(s *admServer) hardResult
	// check, for a client let in, says what is wrong with its output.
	check func(r hardResult) string
}

func TestTLSPSKClients(t *testing.T) {
	hardRequire(t, "psktool", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy", "nbdkit")
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	tlsRun(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
	tlsRun(t, "qemu-io", "-c", "write -q -P 0x5a 0 1M", "-c", "write -q -P 0xa5 3M 64k", img)
	want := hardQemuRaw(t, img)
	raw := filepath.Join(dir, "a.raw")
	if err := os.WriteFile(raw, want, 0o644); err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(dir, "good")
	keys := pskKeys(t, good, "alice", "qemu")
	// The same usernames with other keys, and a username the server
	// does not know.
	wrong := filepath.Join(dir, "wrong")
	pskKeys(t, wrong, "alice", "qemu")
	unknown := filepath.Join(dir, "unknown")
	pskKeys(t, unknown, "carol")

	qemuObj := func(d, user string) string {
		o := "tls-creds-psk,id=tls0,endpoint=client,dir=" + d
		if user != "" {
			o += ",username=" + user // else QEMU's default, "qemu"
		}
		return o
	}
	qemuOpts := func(s *admServer, tls bool) string {
		o := "driver=nbd,path=" + s.addr
		if s.network == "tcp" {
			host, port, _ := strings.Cut(s.addr, ":")
			o = "driver=nbd,host=" + host + ",port=" + port
		}
		if tls {
			o += ",tls-creds=tls0"
		}
		return o
	}
	libnbdURI := func(s *admServer, user, file string) string {
		if s.network == "tcp" {
			return "nbds://" + user + "@" + s.addr + "/?tls-psk-file=" + file
		}
		return "nbds+unix://" + user + "@/?socket=" + s.addr + "&tls-psk-file=" + file
	}
	qemuImgInfo := func(d, user string) func(*admServer) hardResult {
		return func(s *admServer) hardResult {
			return hardExec(30*time.Second, "qemu-img", "info", "--output=json", "--object", qemuObj(d, user), "--image-opts", qemuOpts(s, true))
		}
	}
	wantSize := func(r hardResult) string {
		if !bytes.Contains(r.stdout, []byte(`"virtual-size": 4194304`)) {
			return "no virtual-size 4194304 in " + string(r.stdout)
		}
		return ""
	}
	clients := []pskClient{
		{"qemu-img info, username alice", true, qemuImgInfo(good, "alice"), wantSize},
		{"qemu-img info, QEMU's default username", true, qemuImgInfo(good, ""), wantSize},
		{"qemu-io read", true, func(s *admServer) hardResult {
			return hardExec(30*time.Second, "qemu-io", "-r", "--object", qemuObj(good, "alice"), "--image-opts", qemuOpts(s, true),
				"-c", "read -P 0x5a 0 1M", "-c", "read -P 0xa5 3M 64k", "-c", "read -P 0 1M 2M")
		}, func(r hardResult) string {
			if n := strings.Count(string(r.stdout), "read "); n != 3 || bytes.Contains(r.stdout, []byte("Pattern verification failed")) {
				return "output " + string(r.stdout)
			}
			return ""
		}},
		{"nbdinfo", true, func(s *admServer) hardResult {
			return hardExec(30*time.Second, "nbdinfo", "--size", libnbdURI(s, "alice", keys))
		}, func(r hardResult) string {
			if strings.TrimSpace(string(r.stdout)) != "4194304" {
				return "size " + string(r.stdout)
			}
			return ""
		}},
		{"nbdcopy (4 connections)", true, func(s *admServer) hardResult {
			return hardExec(30*time.Second, "nbdcopy", "--connections=4", libnbdURI(s, "qemu", keys), "-")
		}, func(r hardResult) string {
			if !bytes.Equal(r.stdout, want) {
				return fmt.Sprintf("%d bytes that are not the image's", len(r.stdout))
			}
			return ""
		}},
		{"qemu-img info, wrong key", false, qemuImgInfo(wrong, "alice"), nil},
		{"qemu-img info, unknown username", false, qemuImgInfo(unknown, "carol"), nil},
		{"nbdinfo, wrong key", false, func(s *admServer) hardResult {
			return hardExec(30*time.Second, "nbdinfo", "--size", libnbdURI(s, "alice", filepath.Join(wrong, "keys.psk")))
		}, nil},
		{"nbdinfo, unknown username", false, func(s *admServer) hardResult {
			return hardExec(30*time.Second, "nbdinfo", "--size", libnbdURI(s, "carol", filepath.Join(unknown, "keys.psk")))
		}, nil},
		{"qemu-img info without TLS", false, func(s *admServer) hardResult {
			return hardExec(30*time.Second, "qemu-img", "info", "--image-opts", qemuOpts(s, false))
		}, nil},
		{"nbdinfo without TLS", false, func(s *admServer) hardResult {
			return hardExec(30*time.Second, "nbdinfo", "--size", strings.Replace(libnbdURI(s, "alice", keys), "nbds", "nbd", 1))
		}, nil},
	}

	nbdkit := func(t *testing.T, port string) *admServer {
		s := &admServer{name: "nbdkit", network: "unix", addr: filepath.Join(t.TempDir(), "s")}
		args := []string{"-f", "-r", "--tls=require", "--tls-psk=" + keys}
		if port != "" {
			s.network, s.addr = "tcp", "127.0.0.1:"+port
			args = append(args, "-i", "127.0.0.1", "-p", port)
		} else {
			args = append(args, "-U", s.addr)
		}
		s.proc = hardStart(t, "nbdkit", append(args, "file", raw)...)
		t.Cleanup(func() { s.proc.stop(t) })
		admWaitDial(t, s.proc, s.network, s.addr)
		return s
	}
	for _, network := range []string{"unix", "tcp"} {
		t.Run(network, func(t *testing.T) {
			port := ""
			if network == "tcp" {
				port = admFreePort(t)
			}
			ref := nbdkit(t, port)
			if port != "" {
				port = admFreePort(t)
			}
			s := admStart(t, true, port, img, "--tls-psk", keys, "--tls-required", "-v")
			for _, c := range clients {
				r := c.run(s)
				okay := r.code == 0 && !r.timedOut
				k := c.run(ref)
				if kok := k.code == 0 && !k.timedOut; kok != c.ok {
					t.Errorf("%s: nbdkit (the reference) let in %v, the test expects %v: %s", c.name, kok, c.ok, k)
				}
				switch {
				case okay != c.ok:
					t.Errorf("%s: nbdgw let in %v, want %v: %s\n%s", c.name, okay, c.ok, r, r.stdout)
				case okay && c.check != nil:
					if msg := c.check(r); msg != "" {
						t.Errorf("%s: %s", c.name, msg)
					}
				case !okay:
					t.Logf("%s: refused: %s", c.name, strings.TrimSpace(string(r.stderr)))
				}
			}
			// Still serving after the refusals.
			if r := clients[0].run(s); r.code != 0 {
				t.Errorf("after the refused clients: %s", r)
			}
			for _, p := range []*admServer{s, ref} {
				r := p.proc.stop(t)
				if p == s {
					hardSane(t, r)
					log := string(r.stderr)
					for _, w := range []string{`unknown username "carol"`, `handshake with username "alice"`} {
						if !strings.Contains(log, w) {
							t.Errorf("server log has no %q:\n%s", w, hardClip(r.stderr))
						}
					}
					if n := strings.Count(log, "tls=true"); n < 6 {
						t.Errorf("%d clients negotiated with TLS, want at least 6:\n%s", n, hardClip(r.stderr))
					}
					t.Logf("nbdgw's log of the refusals:\n%s", pskRefusals(log))
					if strings.Contains(log, "tls=false") {
						t.Errorf("a client negotiated without TLS:\n%s", hardClip(r.stderr))
					}
				}
			}
		})
	}
}

// TestTLSPSKStart: key files nbdgw serve refuses at start, each with one
// line naming the problem; --tls-psk with --tls-creds is a usage error;
// and a build without cgo refuses --tls-psk, saying why, and says so in
// --help.
func TestTLSPSKStart(t *testing.T) {
	hardRequire(t, "qemu-img", "psktool")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	tlsRun(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	good := pskKeys(t, filepath.Join(dir, "good"), "alice")
	file := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	unreadable := file("unreadable", "alice:00\n")
	os.Chmod(unreadable, 0)
	cases := []struct{ file, want string }{
		{filepath.Join(dir, "missing"), "no such file or directory"},
		{file("empty", ""), "no username:hexkey line"},
		{file("nocolon", "alice\n"), "line 1: not username:hexkey"},
		{file("nothex", "alice:00\nbob:zz\n"), `line 2: key for "bob" is not an even number of hex digits`},
		{file("odd", "alice:abc\n"), "not an even number of hex digits"},
		{file("twice", "alice:00\nalice:11\n"), `username "alice" appears twice`},
	}
	if os.Geteuid() != 0 { // root reads a mode 0 file
		cases = append(cases, struct{ file, want string }{unreadable, "permission denied"})
	}
	for _, c := range cases {
		r := hardExec(10*time.Second, bin, "serve", "--socket", filepath.Join(t.TempDir(), "s"), "--tls-psk", c.file, img)
		if r.code != 1 || !strings.Contains(string(r.stderr), c.want) || strings.Count(strings.TrimSpace(string(r.stderr)), "\n") != 0 {
			t.Errorf("%s: want exit 1 and one line with %q: %s", filepath.Base(c.file), c.want, r)
		}
	}
	r := hardExec(10*time.Second, bin, "serve", "--tls-psk", good, "--tls-creds", dir, img)
	if r.code != 2 || !strings.Contains(string(r.stderr), "--tls-creds and --tls-psk exclude each other") {
		t.Errorf("--tls-psk with --tls-creds: %s", r)
	}
	s := admStart(t, true, "", img, "--tls-psk", good)
	hardSane(t, s.proc.stop(t))

	static := filepath.Join(t.TempDir(), "nbdgw")
	build := exec.Command("go", "build", "-o", static, "github.com/nbdgw/nbdgw/cmd/nbdgw")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("CGO_ENABLED=0 go build: %v\n%s", err, out)
	}
	r = hardExec(10*time.Second, static, "serve", "--socket", filepath.Join(t.TempDir(), "s"), "--tls-psk", good, img)
	if r.code != 1 || strings.TrimSpace(string(r.stderr)) != "nbdgw serve: this nbdgw was built without cgo: TLS-PSK needs GnuTLS" {
		t.Errorf("--tls-psk without cgo: %s", r)
	}
	r = hardExec(10*time.Second, static, "serve", "--help")
	if !bytes.Contains(r.stdout, []byte("needs a build with cgo")) {
		t.Errorf("serve --help does not say that --tls-psk needs cgo:\n%s", r.stdout)
	}
}

// pskRefusals are the handshake errors of a server log.
func pskRefusals(log string) string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "handshake: ") && !strings.Contains(l, "level=") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestTLSPSKHandshakeTimeout: a client that asks for STARTTLS and then
// stays silent is dropped at --handshake-timeout (the deadline reaches
// the GnuTLS handshake), and a good client is served meanwhile.
func TestTLSPSKHandshakeTimeout(t *testing.T) {
	hardRequire(t, "psktool", "qemu-img", "nbdinfo")
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	tlsRun(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	keys := pskKeys(t, filepath.Join(dir, "k"), "alice")
	s := admStart(t, true, "", img, "--tls-psk", keys, "--tls-required", "--handshake-timeout", "1s")
	c, err := net.Dial("unix", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	hello := make([]byte, 18)
	if _, err := io.ReadFull(c, hello); err != nil {
		t.Fatal(err)
	}
	opt := binary.BigEndian.AppendUint32(nil, 3) // fixed newstyle, no zeroes
	opt = append(opt, "IHAVEOPT"...)
	opt = binary.BigEndian.AppendUint32(opt, 5) // NBD_OPT_STARTTLS
	opt = binary.BigEndian.AppendUint32(opt, 0)
	if _, err := c.Write(opt); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, 20)
	if _, err := io.ReadFull(c, reply); err != nil || binary.BigEndian.Uint32(reply[12:]) != 1 {
		t.Fatalf("STARTTLS reply %x: %v", reply, err)
	}
	start := time.Now()
	// Silent: no ClientHello. A good client is served meanwhile.
	if r := hardExec(30*time.Second, "nbdinfo", "--size", "nbds+unix://alice@/?socket="+s.addr+"&tls-psk-file="+keys); r.code != 0 {
		t.Errorf("nbdinfo beside a silent client: %s", r)
	}
	n, err := c.Read(make([]byte, 1))
	if waited := time.Since(start); n != 0 || err == nil || waited > 5*time.Second {
		t.Errorf("silent client: read %d, %v after %v; want the server to close at about 1s", n, err, waited)
	} else {
		t.Logf("silent client dropped after %v: %v", waited.Round(10*time.Millisecond), err)
	}
	r := s.proc.stop(t)
	hardSane(t, r)
	if !strings.Contains(string(r.stderr), "TLS-PSK handshake: ") || !strings.Contains(string(r.stderr), "timeout") {
		t.Errorf("server log does not say the TLS-PSK handshake timed out:\n%s", hardClip(r.stderr))
	}
}

// TestTLSPSKWrite: writes through TLS-PSK (qemu-io, 3 MiB in records
// from the client) reach the image, as qemu-io then reads it locally.
func TestTLSPSKWrite(t *testing.T) {
	hardRequire(t, "psktool", "qemu-img", "qemu-io")
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	tlsRun(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
	kdir := filepath.Join(dir, "k")
	keys := pskKeys(t, kdir, "alice")
	s := admStart(t, true, "", img, "--tls-psk", keys, "--tls-required", "--writable")
	r := hardExec(30*time.Second, "qemu-io", "--object", "tls-creds-psk,id=tls0,endpoint=client,dir="+kdir+",username=alice",
		"--image-opts", "driver=nbd,path="+s.addr+",tls-creds=tls0", "-c", "write -P 0x33 512k 3M", "-c", "flush")
	if r.code != 0 || !strings.Contains(string(r.stdout), "wrote 3145728/3145728") {
		t.Fatalf("qemu-io write over TLS-PSK: %s\n%s", r, r.stdout)
	}
	hardSane(t, s.proc.stop(t))
	r = hardExec(30*time.Second, "qemu-io", "-r", "-c", "read -P 0x33 512k 3M", "-c", "read -P 0 0 512k", "-c", "read -P 0 3584k 4608k", img)
	if r.code != 0 || strings.Count(string(r.stdout), "read ") != 3 || strings.Contains(string(r.stdout), "Pattern verification failed") {
		t.Errorf("the image after the writes: %s\n%s", r, r.stdout)
	}
	if r := hardExec(30*time.Second, "qemu-img", "check", img); r.code != 0 {
		t.Errorf("qemu-img check: %s\n%s", r, r.stdout)
	}
}
