package integration

// nbdgw serve with several exports: --export NAME=IMAGE[,opts] and
// --export-dir DIR, checked with nbdinfo, nbdcopy, qemu-img and qemu-io.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nbdgw/nbdgw/nbdserver/nbdclient"
	"github.com/nbdgw/nbdgw/nbdserver/nbdproto"
)

// exportsURI is the URI of export name on the unix socket sock.
func exportsURI(sock, name string) string { return "nbd+unix:///" + name + "?socket=" + sock }

// listedExport is one export of nbdinfo --list --json.
type listedExport struct {
	Name        string   `json:"export-name"`
	Description string   `json:"description"`
	Contexts    []string `json:"contexts"`
	ReadOnly    bool     `json:"is_read_only"`
	Size        int64    `json:"export-size"`
}

func nbdinfoList(t *testing.T, sock string) map[string]listedExport {
	t.Helper()
	var l struct {
		Exports []listedExport `json:"exports"`
	}
	if err := json.Unmarshal(runOutput(t, "nbdinfo", "--list", "--json", exportsURI(sock, "")), &l); err != nil {
		t.Fatal(err)
	}
	m := map[string]listedExport{}
	for _, e := range l.Exports {
		m[e.Name] = e
	}
	return m
}

// qemuRaw is qemu-img convert of image (or an NBD URI) to raw.
func qemuRaw(t *testing.T, src string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "raw")
	runOutput(t, "qemu-img", "convert", "-O", "raw", src, out)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestExportsStatic(t *testing.T) {
	nbdRequire(t, "nbdcopy")
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	a := filepath.Join(dir, "a.qcow2")
	b := filepath.Join(dir, "b,x=y.qcow2") // ',' and '=' in the file name
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", a, "4M")
	runOutput(t, "qemu-io", "-c", "write -P 0xaa 0 1M", "-c", "write -P 0x11 3M 64k", a)
	runOutput(t, "qemu-img", "bitmap", "--add", a, "b0")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", b, "2M")
	runOutput(t, "qemu-io", "-c", "write -P 0x55 64k 128k", b)
	wantA, wantB := qemuRaw(t, a), qemuRaw(t, b)

	sock := filepath.Join(dir, "s.sock")
	nbdStart(t, sock, bin, "serve", "-k", sock,
		"--export", "disk-a="+a+",description=the first disk,, read-only",
		"--export", "disk-b="+strings.ReplaceAll(b, ",", ",,")+",writable,description=scratch",
		// The same file again, read-only: opened once (a second open
		// would conflict with the writable one's locks).
		"--export", "alias-b="+strings.ReplaceAll(b, ",", ",,"))

	l := nbdinfoList(t, sock)
	if len(l) != 3 {
		t.Fatalf("nbdinfo --list: %d exports, want 3: %v", len(l), l)
	}
	ea, eb := l["disk-a"], l["disk-b"]
	if ea.Description != "the first disk, read-only" || eb.Description != "scratch" {
		t.Errorf("descriptions %q, %q", ea.Description, eb.Description)
	}
	if !ea.ReadOnly || eb.ReadOnly {
		t.Errorf("read-only: disk-a %v, disk-b %v; want true, false", ea.ReadOnly, eb.ReadOnly)
	}
	if ea.Size != int64(len(wantA)) || eb.Size != int64(len(wantB)) {
		t.Errorf("sizes %d, %d; want %d, %d", ea.Size, eb.Size, len(wantA), len(wantB))
	}
	// Each export has its own contexts: the bitmap is on disk-a only.
	if !slices.Contains(ea.Contexts, "qemu:dirty-bitmap:b0") || slices.Contains(eb.Contexts, "qemu:dirty-bitmap:b0") {
		t.Errorf("contexts: disk-a %v, disk-b %v; want the bitmap on disk-a only", ea.Contexts, eb.Contexts)
	}

	// Contents: nbdcopy of disk-a, qemu-img convert of disk-b.
	out := filepath.Join(dir, "a.raw")
	runOutput(t, "nbdcopy", exportsURI(sock, "disk-a"), out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, wantA) {
		t.Error("nbdcopy of disk-a differs from qemu-img convert of a.qcow2")
	}
	if !bytes.Equal(qemuRaw(t, exportsURI(sock, "disk-b")), wantB) {
		t.Error("qemu-img convert of disk-b differs from qemu-img convert of the image")
	}
	// The default export "" is the first one.
	if !bytes.Equal(qemuRaw(t, exportsURI(sock, "")), wantA) {
		t.Error(`export "" is not disk-a`)
	}

	// Writable beside read-only: the write to disk-a is refused (EPERM).
	exportsWriteRefused(t, exportsURI(sock, "disk-a"))
	runOutput(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4k", exportsURI(sock, "disk-b"))
	runOutput(t, "qemu-io", "-f", "raw", "-c", "read -P 0x77 0 4k", "-c", "read -P 0x55 64k 128k", exportsURI(sock, "disk-b"))
	if !bytes.Equal(qemuRaw(t, exportsURI(sock, "disk-a")), wantA) {
		t.Error("disk-a changed")
	}
	exportsWriteRefused(t, exportsURI(sock, "alias-b"))
	runOutput(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0x77 0 4k", exportsURI(sock, "alias-b"))

	// An unknown name is an error reply; the server keeps serving.
	if o, err := exec.Command("nbdinfo", exportsURI(sock, "nope")).CombinedOutput(); err == nil || !strings.Contains(string(o), "server replied with error") {
		t.Errorf("nbdinfo of a missing export: %v\n%s", err, o)
	}
	runOutput(t, "nbdinfo", "--size", exportsURI(sock, "disk-a"))
}

func TestExportsDir(t *testing.T) {
	nbdRequire(t, "nbdcopy")
	bin := nbdgwBinary(t)
	top := t.TempDir()
	dir := filepath.Join(top, "images")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	one := filepath.Join(dir, "one")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", one, "1M")
	runOutput(t, "qemu-io", "-c", "write -P 0x31 0 64k", one)
	outside := filepath.Join(top, "x")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", outside, "1M")
	if err := os.Mkdir(filepath.Join(dir, "subdir"), 0o755); err != nil {
		t.Fatal(err)
	}

	sock := filepath.Join(top, "s.sock")
	_, stderr := nbdStartLogged(t, sock, bin, "serve", "-k", sock, "--export-dir", dir, "--writable")

	// An image added after the start is an export at once.
	two := filepath.Join(dir, "two")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", two, "2M")
	runOutput(t, "qemu-io", "-c", "write -P 0x32 1M 64k", two)
	l := nbdinfoList(t, sock)
	var names []string
	for n := range l {
		names = append(names, n)
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"one", "two"}) { // regular files only: no subdir
		t.Errorf("nbdinfo --list: %q", names)
	}
	for _, n := range []string{"one", "two"} {
		out := filepath.Join(top, n+".raw")
		runOutput(t, "nbdcopy", exportsURI(sock, n), out)
		got, _ := os.ReadFile(out)
		if !bytes.Equal(got, qemuRaw(t, filepath.Join(dir, n))) {
			t.Errorf("nbdcopy of %s differs from qemu-img convert", n)
		}
	}

	// A backing file outside DIR is refused too (Confine). (Created after
	// the listing: nbdinfo --list gives up on an export it cannot open.)
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", outside, "-F", "qcow2", filepath.Join(dir, "escapes"))
	for _, bad := range []string{"../x", "escapes", "nope", "subdir", ".."} {
		if o, err := exec.Command("nbdinfo", exportsURI(sock, bad)).CombinedOutput(); err == nil || !strings.Contains(string(o), "server replied with error") {
			t.Errorf("nbdinfo of %q: %v\n%s", bad, err, o)
		}
	}
	if !strings.Contains(stderr.String(), "outside the confinement directory") {
		t.Errorf("the server's log does not say why escapes is refused:\n%s", stderr)
	}

	// Two clients of one export share one open image: the writable open
	// holds QEMU's write lock (qemu-img info is refused) and a second
	// open of the same file would conflict with it; the second client is
	// served all the same. When both are gone the image is closed and its
	// locks released.
	c1, err := nbdclient.Dial(context.Background(), exportsURI(sock, "one"), nbdclient.Options{StructuredReplies: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	if o, err := exec.Command("qemu-img", "info", one).CombinedOutput(); err == nil || !strings.Contains(string(o), "lock") {
		t.Errorf("qemu-img info while a client uses the export: %v\n%s", err, o)
	}
	c2, err := nbdclient.Dial(context.Background(), exportsURI(sock, "one"), nbdclient.Options{StructuredReplies: true})
	if err != nil {
		t.Fatalf("second client of one export: %v", err)
	}
	p := make([]byte, 4096)
	if _, err := c2.ReadAt(p, 0); err != nil || p[0] != 0x31 {
		t.Errorf("second client read: %v, %#x", err, p[0])
	}
	runOutput(t, "qemu-io", "-f", "raw", "-c", "write -P 0x41 8k 4k", exportsURI(sock, "one"))
	if _, err := c1.ReadAt(p, 8192); err != nil || p[0] != 0x41 {
		t.Errorf("first client does not see a third's write: %v, %#x", err, p[0])
	}
	c1.Close()
	c2.Close()
	var o []byte
	for i := 0; i < 100; i++ { // the server sees the disconnects soon after
		if o, err = exec.Command("qemu-img", "info", one).CombinedOutput(); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Errorf("qemu-img info after the last client left: %v\n%s", err, o)
	}
	runOutput(t, "qemu-io", "-c", "read -P 0x41 8k 4k", one)
}

func TestExportsDirReadOnly(t *testing.T) {
	nbdRequire(t)
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "ro")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	sock := filepath.Join(t.TempDir(), "s.sock")
	nbdStart(t, sock, bin, "serve", "-k", sock, "--export-dir", dir)
	exportsWriteRefused(t, exportsURI(sock, "ro"))
	// qemu-io refuses to open it read-write at all.
	if o, err := exec.Command("qemu-io", "-f", "raw", "-c", "write 0 4k", exportsURI(sock, "ro")).CombinedOutput(); err == nil {
		t.Errorf("qemu-io write to an --export-dir export without --writable succeeded\n%s", o)
	}
}

// exportsWriteRefused checks that the export at uri is advertised
// read-only and that a WRITE sent anyway is answered NBD_EPERM.
func exportsWriteRefused(t *testing.T, uri string) {
	t.Helper()
	c, err := nbdclient.Dial(context.Background(), uri, nbdclient.Options{StructuredReplies: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if c.TransmissionFlags()&nbdproto.FlagReadOnly == 0 {
		t.Errorf("%s: NBD_FLAG_READ_ONLY not set", uri)
	}
	_, err = c.WriteAt(make([]byte, 4096), 0)
	var se *nbdproto.ServerError
	if !errors.As(err, &se) || se.Errno != nbdproto.EPERM {
		t.Errorf("%s: write answered %v; want NBD_EPERM", uri, err)
	}
}

func TestExportsBadSyntax(t *testing.T) {
	bin := nbdgwBinary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "a.qcow2")
	runOutput(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
	for _, args := range [][]string{
		{"--export", "noequals"},
		{"--export", "=" + img},
		{"--export", "a="},
		{"--export", "a=" + img + ",wrtable"},
		{"--export", "a=" + img + ",description=x, y"},
		{"--export", "a=" + img, img},
		{"--export", "a=" + img, "--export-name", "b"},
		{"--export", "a=" + img, "--writable"},
		{"--export", "a=" + img, "--export", "a=" + img},
	} {
		cmd := exec.Command(bin, append([]string{"serve", "-k", filepath.Join(dir, "s.sock")}, args...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		err := cmd.Run()
		code := -1
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		msg := stderr.String()
		if code != 2 || strings.Count(msg, "\n") != 1 {
			t.Errorf("serve %q: exit %d, stderr %q; want exit 2 and one line", args, code, msg)
		}
	}
}
