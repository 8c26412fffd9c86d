package qcow2_test

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/nbdgw/nbdgw/qcow2"
)

// TestInfoSizesMatchQemuImg: the human sizes ("977 KiB", "1.5 GiB",
// "0 B") are QEMU's size_to_str() for sizes around every switch of
// unit, as qemu-img info prints them.
func TestInfoSizesMatchQemuImg(t *testing.T) {
	needTools(t, "qemu-img")
	dir := t.TempDir()
	line := regexp.MustCompile(`(?m)^virtual size: (.*) \((\d+) bytes\)$`)
	for i, size := range []int64{0, 512, 1000 * 512, 2000 * 512, 1023 * 1024, 1024 * 1024, 1536 * 1024,
		999 << 20, 1000 << 20, 1023<<20 + 512, 10 << 30, 123456789 * 512, 1 << 40, 1000 << 40, 3 << 50, 1 << 60} {
		name := "s" + strconv.Itoa(i) + ".qcow2"
		run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", name, strconv.FormatInt(size, 10))
		want := line.FindStringSubmatch(run(t, dir, "qemu-img", "info", name))
		if want == nil || want[2] != strconv.FormatInt(size, 10) {
			t.Fatalf("qemu-img info %d: %q", size, want)
		}
		img, err := qcow2.Open(filepath.Join(dir, name), qcow2.Options{})
		if err != nil {
			t.Fatal(err)
		}
		ci, err := img.Info()
		img.Close()
		if err != nil {
			t.Fatal(err)
		}
		got := line.FindStringSubmatch(ci.Human(false))
		if got == nil || got[1] != want[1] || got[2] != want[2] {
			t.Errorf("%d bytes: nbdgw %q, qemu-img %q", size, got, want)
		}
	}
}

// TestInfoSnapshotTableBounds: a snapshot table entry with more extra
// data than QEMU allows is a one-line error of Info (qemu-img refuses
// it too); one whose names run past the end of the file reads zeroes
// there, as QEMU's does, and Info says what qemu-img info says.
func TestInfoSnapshotTableBounds(t *testing.T) {
	needTools(t, "qemu-img")
	dir := t.TempDir()
	run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M")
	run(t, dir, "qemu-img", "snapshot", "-c", "s1", "base.qcow2")
	orig, err := os.ReadFile(filepath.Join(dir, "base.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	table := int64(binary.BigEndian.Uint64(orig[64:]))
	for _, c := range []struct {
		name string
		at   int64 // offset in the first entry
		val  []byte
		want string
	}{
		{"extra-data", 36, []byte{0, 0, 0x10, 0}, "snapshot extra data of 4096 bytes"},
		// 40 + 1024 + 2*65535 bytes from the table's offset: past the end.
		{"past-end", 12, []byte{0xff, 0xff, 0xff, 0xff}, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := append([]byte(nil), orig...)
			copy(b[table+c.at:], c.val)
			if c.name == "past-end" {
				copy(b[table+36:], []byte{0, 0, 4, 0}) // 1024 bytes of extra data
			}
			if c.name == "past-end" && table+40+1024+2*65535 <= int64(len(b)) {
				t.Fatalf("the table at %#x is too far from the end of the %d-byte file", table, len(b))
			}
			p := filepath.Join(dir, c.name+".qcow2")
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			out, qerr := exec.Command("qemu-img", "info", p).CombinedOutput()
			img, err := qcow2.Open(p, qcow2.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer img.Close()
			ci, err := img.Info()
			if c.want == "" {
				if qerr != nil || err != nil || ci.Human(false) != string(out) {
					t.Errorf("Info: %v, qemu-img info: %v; nbdgw:\n%s\nqemu-img:\n%s", err, qerr, ci.Human(false), out)
				}
				return
			}
			if qerr == nil {
				t.Errorf("qemu-img info accepts it:\n%s", out)
			}
			if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("Info: %v, want one line with %q", err, c.want)
			}
		})
	}
}

// FuzzInfoJSON: whatever a name holds (it comes from the image or the
// command line), the JSON output parses, and gives the name back
// (invalid UTF-8 as U+FFFD, as QEMU's JSON writer does).
func FuzzInfoJSON(f *testing.F) {
	for _, s := range []string{"a.qcow2", "w\x01é💾\"\\.qcow2", "\xff\xfe", "\u2028\x7f/", ""} {
		f.Add(s, int64(1<<20))
	}
	f.Fuzz(func(t *testing.T, name string, size int64) {
		for _, chain := range []bool{false, true} {
			out := qcow2.NBDExportInfo(name, size).JSON(chain)
			var v struct {
				Filename string `json:"filename"`
				Size     int64  `json:"virtual-size"`
			}
			var err error
			if chain {
				var l []*struct {
					Filename string `json:"filename"`
					Size     int64  `json:"virtual-size"`
				}
				if err = json.Unmarshal(out, &l); err == nil && len(l) == 1 {
					v.Filename, v.Size = l[0].Filename, l[0].Size
				}
			} else {
				err = json.Unmarshal(out, &v)
			}
			if err != nil {
				t.Fatalf("%v:\n%s", err, out)
			}
			// Each byte of invalid UTF-8 becomes U+FFFD (QEMU's
			// mod_utf8_codepoint may take a bad sequence as one).
			var want strings.Builder
			for _, r := range name {
				want.WriteRune(r)
			}
			if v.Filename != want.String() || v.Size != size {
				t.Errorf("name %q size %d: JSON gives %q %d:\n%s", name, size, v.Filename, v.Size, out)
			}
		}
	})
}
