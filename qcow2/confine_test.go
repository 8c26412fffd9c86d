package qcow2

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestConfineChecksTheOpenedFile: the check is made on the descriptor,
// after every symlink, and only regular files pass.
func TestConfineChecksTheOpenedFile(t *testing.T) {
	root := t.TempDir()
	in, out := filepath.Join(root, "in"), filepath.Join(root, "out")
	os.Mkdir(in, 0o755)
	os.Mkdir(out, 0o755)
	os.WriteFile(filepath.Join(in, "ok"), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(out, "secret"), []byte("x"), 0o644)
	os.Symlink("../out/secret", filepath.Join(in, "link"))
	os.Symlink("ok", filepath.Join(in, "inlink"))
	os.Mkdir(filepath.Join(in, "sub"), 0o755)
	unix.Mkfifo(filepath.Join(in, "fifo"), 0o644)
	c, err := newConfiner(filepath.Join(in, "ok"), "")
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{
		"ok":               "",
		"inlink":           "",
		"sub/../ok":        "",
		"link":             "outside the confinement directory",
		"../out/secret":    "outside the confinement directory",
		"sub":              "not a regular file",
		"fifo":             "not a regular file",
		"../in/../in/fifo": "not a regular file",
	} {
		h, err := c.open(filepath.Join(in, name), "image "+name, false)
		if want == "" {
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			if h.name != filepath.Join(in, name) {
				t.Errorf("%s: name %q", name, h.name)
			}
			h.close()
			continue
		}
		if err == nil {
			h.close()
			t.Errorf("%s: opened", name)
			continue
		}
		if !errors.Is(err, ErrConfined) || !strings.Contains(err.Error(), want) || !strings.HasPrefix(err.Error(), "image "+name+" resolves to ") {
			t.Errorf("%s: %v", name, err)
		}
	}
	// The root directory confines nothing but non-regular files.
	all, err := newConfiner("x", "/")
	if err != nil {
		t.Fatal(err)
	}
	if h, err := all.open(filepath.Join(out, "secret"), "image", false); err != nil {
		t.Errorf("--confine=/: %v", err)
	} else {
		h.close()
	}
	if _, err := all.open("/dev/null", "image", false); !errors.Is(err, ErrConfined) {
		t.Errorf("/dev/null: %v", err)
	}
	if _, err := newConfiner("x", filepath.Join(root, "nope")); err == nil {
		t.Error("a missing confinement directory accepted")
	}
}

// TestConfineChain: Open with Confine refuses a backing file outside the
// directory, naming the header field, and accepts it with a wider
// ConfineDir.
func TestConfineChain(t *testing.T) {
	root := t.TempDir()
	in := filepath.Join(root, "in")
	os.Mkdir(in, 0o755)
	qemuImg(t, "create", "-q", "-f", "qcow2", filepath.Join(root, "base.qcow2"), "1M")
	top := filepath.Join(in, "top.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", top)
	realRoot, _ := filepath.EvalSymlinks(root)
	_, err := Open(top, Options{Confine: true})
	want := `backing file name "../base.qcow2" (header of ` + top + ") resolves to " + filepath.Join(realRoot, "base.qcow2") + ", outside the confinement directory " + filepath.Join(realRoot, "in")
	if err == nil || err.Error() != want || !errors.Is(err, ErrConfined) {
		t.Errorf("got  %v\nwant %s", err, want)
	}
	img, err := Open(top, Options{Confine: true, ConfineDir: root})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(img.Layers()); n != 2 {
		t.Errorf("%d layers", n)
	}
	img.Close()
	img, err = Open(top, Options{Confine: true, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	img.Close()
}

// TestConfineSymlinkRace: a symlink swapped between a file inside and one
// outside while files are opened never lets the outside one through: what
// is checked is the descriptor, and what is read is that descriptor's
// file.
func TestConfineSymlinkRace(t *testing.T) {
	root := t.TempDir()
	in := filepath.Join(root, "in")
	os.Mkdir(in, 0o755)
	os.WriteFile(filepath.Join(in, "good"), []byte("inside"), 0o644)
	os.WriteFile(filepath.Join(root, "bad"), []byte("SECRET"), 0o644)
	link := filepath.Join(in, "link")
	os.Symlink("good", link)
	c, err := newConfiner(link, "")
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tmp := filepath.Join(in, "link.tmp")
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			target := "good"
			if i%2 == 1 {
				target = "../bad"
			}
			os.Remove(tmp)
			os.Symlink(target, tmp)
			os.Rename(tmp, link) // atomic swap
		}
	}()
	opened, refused := 0, 0
	for i := 0; i < 2000; i++ {
		h, err := c.open(link, "image link", false)
		if err != nil {
			if !errors.Is(err, ErrConfined) && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("open: %v", err)
			}
			refused++
			continue
		}
		b := make([]byte, 6)
		h.readFull(b, 0)
		h.close()
		if string(b) != "inside" {
			t.Fatalf("read %q through the confined open", b)
		}
		opened++
	}
	close(stop)
	<-done
	t.Logf("%d opened (all inside), %d refused", opened, refused)
}
