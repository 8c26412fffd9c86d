package fusefs

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// partxPartitions is what util-linux's libblkid (partx) finds in file, in
// our terms: the MBR extended container, which Linux exposes only as a
// 1 KiB stub, is left out, as Partitions leaves it out.
func partxPartitions(t *testing.T, file string) []Partition {
	t.Helper()
	out, err := exec.Command("partx", "-g", "-b", "-o", "NR,START,SECTORS,TYPE", file).Output()
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok && len(out) == 0 && bytes.Contains(ee.Stderr, []byte("failed to read partition table")) {
			return nil // no partition table
		}
		t.Fatalf("partx %s: %v", file, err)
	}
	var parts []Partition
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) != 4 {
			continue
		}
		if f[3] == "0x5" || f[3] == "0xf" || f[3] == "0x85" {
			continue
		}
		nr, err1 := strconv.Atoi(f[0])
		start, err2 := strconv.ParseInt(f[1], 10, 64)
		sectors, err3 := strconv.ParseInt(f[2], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil {
			t.Fatalf("partx line %q", line)
		}
		parts = append(parts, Partition{Number: nr, Start: start * 512, Length: sectors * 512})
	}
	return parts
}

func TestPartitionsAgainstPartx(t *testing.T) {
	for _, tool := range []string{"sfdisk", "partx"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian packages fdisk, util-linux): %v", tool, err)
		}
	}
	tests := []struct {
		name   string
		size   int64
		script string
		extra  []string // a second sfdisk script, appended
		zero   int64    // if > 0, the sector at this LBA is zeroed afterwards
		raw    func() []byte
	}{
		{name: "mbr-ebr-loop", size: 1 << 20, raw: ebrLoop},
		{name: "mbr-one", size: 16 << 20, script: "label: dos\n,,83\n"},
		{name: "mbr-four", size: 32 << 20, script: "label: dos\n,4M,83\n,4M,82\n,4M,7\n,,83\n"},
		{name: "mbr-gap", size: 32 << 20, script: "label: dos\nstart=8192,size=2048,type=83\nstart=40960,size=4096,type=c\n"},
		{name: "mbr-logical", size: 64 << 20, script: "label: dos\n,10M,83\n,40M,5\n,,83\n", extra: []string{",5M,83\n,5M,83\n,,83\n"}},
		{name: "gpt", size: 64 << 20, script: "label: gpt\n,10M\n,1M\n,,\n"},
		{name: "gpt-backup-header", size: 64 << 20, script: "label: gpt\n,10M\n,1M\n,,\n", zero: 1},
		{name: "gpt-sparse-numbers", size: 64 << 20, script: "label: gpt\n5: start=4096,size=2048\n,2M\n"},
		{name: "none", size: 4 << 20, script: ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "disk.img")
			if err := os.WriteFile(file, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(file, tc.size); err != nil {
				t.Fatal(err)
			}
			if tc.script != "" {
				sfdisk(t, file, tc.script)
			}
			if tc.raw != nil {
				if err := os.WriteFile(file, tc.raw(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			for _, s := range tc.extra {
				sfdisk(t, file, s, "--append", "-N", "5")
			}
			if tc.zero > 0 {
				f, err := os.OpenFile(file, os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				_, err = f.WriteAt(make([]byte, 512), tc.zero*512)
				f.Close()
				if err != nil {
					t.Fatal(err)
				}
			}
			want := partxPartitions(t, file)
			f, err := os.Open(file)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got, err := Partitions(f, tc.size)
			if err != nil {
				t.Fatal(err)
			}
			for i := range got {
				got[i].Scheme = ""
			}
			if !equalParts(got, want) {
				t.Errorf("Partitions = %+v\npartx says %+v", got, want)
			}
			if (tc.script != "" || tc.raw != nil) && len(want) == 0 {
				t.Errorf("partx found no partitions: the test makes no point")
			}
		})
	}
}

func sfdisk(t *testing.T, file, script string, args ...string) {
	t.Helper()
	cmd := exec.Command("sfdisk", append([]string{"-q", "--no-reread", "--no-tell-kernel"}, append(args, file)...)...)
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk %q: %v\n%s", script, err, out)
	}
}

func equalParts(a, b []Partition) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestPartitionsBounded checks the parser against tables whose entries
// point past the end of the disk: they are dropped or cut at the end.
func TestPartitionsBounded(t *testing.T) {
	const size = 1 << 20
	mbr := func(entries ...[3]uint32) []byte {
		b := make([]byte, size)
		for i, e := range entries {
			p := b[mbrTableAt+16*i:]
			p[4] = byte(e[0])
			binary.LittleEndian.PutUint32(p[8:], e[1])
			binary.LittleEndian.PutUint32(p[12:], e[2])
		}
		binary.LittleEndian.PutUint16(b[mbrSignatureAt:], 0xAA55)
		return b
	}
	tests := []struct {
		name string
		disk []byte
		want []Partition
	}{
		{"past-end", mbr([3]uint32{0x83, 4096, 100}), nil},
		{"cut-at-end", mbr([3]uint32{0x83, 1024, 0xffffffff}), []Partition{{1, 1024 * 512, size - 1024*512, "mbr"}}},
		{"zero-size", mbr([3]uint32{0x83, 10, 0}), nil},
		{"bad-boot-flag", func() []byte { b := mbr([3]uint32{0x83, 1, 10}); b[mbrTableAt] = 0x12; return b }(), nil},
		{"ebr-missing", mbr([3]uint32{0x05, 2, 100}), nil},
		{"gpt-garbage", mbr([3]uint32{0xee, 1, 0xffffffff}), nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Partitions(bytes.NewReader(tc.disk), int64(len(tc.disk)))
			if err != nil {
				t.Fatal(err)
			}
			if !equalParts(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// FuzzPartitions feeds arbitrary first sectors and GPT arrays to the
// parser: it must not panic, allocate without bound, or return a
// partition outside the disk.
func FuzzPartitions(f *testing.F) {
	seed := make([]byte, 3*512)
	binary.LittleEndian.PutUint16(seed[mbrSignatureAt:], 0xAA55)
	p := seed[mbrTableAt:]
	p[4], p[8], p[12] = 0x83, 1, 1
	f.Add(bytes.Clone(seed), int64(1<<20))
	p[4] = 0x05
	f.Add(bytes.Clone(seed), int64(1<<20))
	f.Add(gptSeed(), int64(1<<20))
	f.Fuzz(func(t *testing.T, data []byte, size int64) {
		if size < 0 || size > 1<<40 {
			return
		}
		r := bytes.NewReader(data) // reads past data fail, as a short disk would
		parts, err := Partitions(r, size)
		if err != nil {
			return
		}
		seen := map[int]bool{}
		for _, p := range parts {
			if p.Start < 0 || p.Length <= 0 || p.Start+p.Length > size || p.Number < 1 || p.Number > maxPartitions || seen[p.Number] {
				t.Fatalf("bad partition %+v on a disk of %d", p, size)
			}
			seen[p.Number] = true
		}
	})
}

// gptSeed is a minimal valid GPT (protective MBR, header, one entry)
// followed by its entry array, 4 sectors.
func gptSeed() []byte {
	b := make([]byte, 4*512)
	binary.LittleEndian.PutUint16(b[mbrSignatureAt:], 0xAA55)
	b[mbrTableAt+4] = 0xee
	h := b[512:1024]
	copy(h, gptSignature)
	binary.LittleEndian.PutUint32(h[12:], 92)
	binary.LittleEndian.PutUint64(h[24:], 1)
	binary.LittleEndian.PutUint64(h[40:], 3)
	binary.LittleEndian.PutUint64(h[48:], 2047)
	binary.LittleEndian.PutUint64(h[72:], 2)
	binary.LittleEndian.PutUint32(h[80:], 4)
	binary.LittleEndian.PutUint32(h[84:], 128)
	e := b[1024:]
	e[0] = 1
	binary.LittleEndian.PutUint64(e[32:], 3)
	binary.LittleEndian.PutUint64(e[40:], 100)
	binary.LittleEndian.PutUint32(h[88:], crc32.ChecksumIEEE(b[1024:1024+4*128]))
	binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h[:92]))
	return b
}

func TestGPTSeedParses(t *testing.T) {
	got, err := Partitions(bytes.NewReader(gptSeed()), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := []Partition{{1, 3 * 512, 98 * 512, "gpt"}}
	if !equalParts(got, want) {
		t.Errorf("got %+v, want %+v", got, want)
	}
}

// ebrLoop is a 1 MiB disk whose extended partition holds one EBR that
// links back to itself after one logical partition.
func ebrLoop() []byte {
	b := make([]byte, 1<<20)
	entry := func(sector int64, i int, typ byte, start, n uint32) {
		e := b[sector*512+mbrTableAt+16*int64(i):]
		e[4] = typ
		binary.LittleEndian.PutUint32(e[8:], start)
		binary.LittleEndian.PutUint32(e[12:], n)
		binary.LittleEndian.PutUint16(b[sector*512+mbrSignatureAt:], 0xAA55)
	}
	entry(0, 0, 0x05, 2, 100)
	entry(2, 0, 0x83, 1, 10)
	entry(2, 1, 0x05, 0, 100)
	return b
}
