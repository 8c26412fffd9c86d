package faultfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestRules checks each rule on a plain file: pass-through, After and
// Count, the write offset range, fsync faults, a full disk, and Clear.
func TestRules(t *testing.T) {
	back := t.TempDir()
	f := New(t, back)
	file, err := os.OpenFile(filepath.Join(f.Dir(), "x"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	write := func(off int64) error {
		_, err := file.WriteAt([]byte("abcd"), off)
		return err
	}
	if err := write(0); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(back, "x")); !bytes.Equal(got, []byte("abcd")) {
		t.Fatalf("backing file holds %q", got)
	}

	f.Set(Fault{Ops: Write, Errno: syscall.EIO, After: 2, Count: 1})
	for i, want := range []error{nil, nil, syscall.EIO, nil} {
		if err := write(0); !errors.Is(err, want) && (want != nil || err != nil) {
			t.Fatalf("write %d: %v, want %v", i, err, want)
		}
	}

	f.Set(Fault{Ops: Write, Errno: syscall.ENOSPC, Off: 4096, Len: 4096})
	if err := write(0); err != nil {
		t.Fatalf("write outside the range: %v", err)
	}
	if err := write(8190); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write overlapping the range: %v", err)
	}
	if err := file.Sync(); err != nil {
		t.Fatalf("fsync under a write fault: %v", err)
	}

	f.Set(Fault{Ops: Fsync, Errno: syscall.EIO, Count: 1})
	if err := file.Sync(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("fsync under an fsync fault: %v", err)
	}
	if err := file.Sync(); err != nil {
		t.Fatalf("fsync after Count ran out: %v", err)
	}

	f.Clear()
	f.DiskFull(6, syscall.ENOSPC)
	if err := write(100); err != nil {
		t.Fatalf("write that fits: %v", err)
	}
	if err := write(200); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write past the room left: %v", err)
	}
	f.Clear()
	if err := write(200); err != nil {
		t.Fatalf("write after Clear: %v", err)
	}
	if st := f.Stats(); st.Failed != 4 {
		t.Fatalf("stats %+v: want 4 failed calls", st)
	}
}
