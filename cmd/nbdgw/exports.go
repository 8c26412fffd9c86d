package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"

	"github.com/nbdgw/nbdgw/nbdserver"
	"github.com/nbdgw/nbdgw/qcow2"
)

// exportSpec is one --export NAME=IMAGE[,writable][,no-backing][,description=TEXT].
type exportSpec struct {
	name, image, description string
	writable, noBacking      bool
}

// exportsFlag collects repeated --export flags.
type exportsFlag []exportSpec

func (f *exportsFlag) String() string { return "" }

func (f *exportsFlag) Set(s string) error {
	e, err := parseExportSpec(s)
	if err != nil {
		return err
	}
	*f = append(*f, e)
	return nil
}

// parseExportSpec parses NAME=IMAGE[,OPTION...]. NAME ends at the first
// '=' (so it has none); a single ',' ends IMAGE and each option, and ",,"
// stands for a literal comma, as in QEMU's option strings: a file name
// "a,b=c" is written "a,,b=c", and '=' in IMAGE or TEXT needs no escape.
func parseExportSpec(s string) (exportSpec, error) {
	var fields []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != ',' {
			cur.WriteByte(s[i])
			continue
		}
		if i+1 < len(s) && s[i+1] == ',' {
			cur.WriteByte(',')
			i++
			continue
		}
		fields = append(fields, cur.String())
		cur.Reset()
	}
	fields = append(fields, cur.String())
	var e exportSpec
	name, image, ok := strings.Cut(fields[0], "=")
	if !ok || name == "" || image == "" {
		return e, errors.New("want NAME=IMAGE[,writable][,no-backing][,description=TEXT]")
	}
	e.name, e.image = name, image
	for _, o := range fields[1:] {
		switch {
		case o == "writable":
			e.writable = true
		case o == "no-backing":
			e.noBacking = true
		case strings.HasPrefix(o, "description="):
			e.description = strings.TrimPrefix(o, "description=")
		default:
			return e, fmt.Errorf("unknown export option %q (want writable, no-backing or description=TEXT; write a comma as \",,\")", o)
		}
	}
	return e, nil
}

// exportGroups numbers the exports so that those of one file (same
// device and inode, same no-backing) share a number: the index of the
// first of them. Files that cannot be stat'ed are alone (their open fails).
func exportGroups(exports []exportSpec) []int {
	g := make([]int, len(exports))
	fis := make([]os.FileInfo, len(exports))
	for i, e := range exports {
		g[i] = i
		fis[i], _ = os.Stat(e.image)
		for j := 0; j < i && fis[i] != nil; j++ {
			if fis[j] != nil && exports[j].noBacking == e.noBacking && os.SameFile(fis[i], fis[j]) {
				g[i] = g[j]
				break
			}
		}
	}
	return g
}

// exportDir is serve --export-dir: every regular file of dir is an
// export named by its file name, opened at a client's first use (NBD_OPT_INFO,
// GO, EXPORT_NAME or a meta context option naming it) and closed, with
// its image locks, when the last connection using it is done. Every file
// of its chain must resolve inside dir (qcow2.Options.Confine).
type exportDir struct {
	dir      string
	opts     qcow2.Options
	writable bool
	logf     func(format string, args ...any)

	mu   sync.Mutex
	open map[string]*dirExport // by name
}

// dirExport is one open image of an exportDir and its users.
type dirExport struct {
	exp  *nbdserver.Export
	refs int
}

func newExportDir(dir string, opts qcow2.Options, writable bool, logf func(string, ...any)) (*exportDir, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("--export-dir: %w", err)
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("--export-dir: %s is not a directory", dir)
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("--export-dir: %w", err)
	}
	opts.Confine, opts.ConfineDir, opts.Writable = true, abs, writable
	return &exportDir{dir: abs, opts: opts, writable: writable, logf: logf, open: map[string]*dirExport{}}, nil
}

// lookup is nbdserver.Config.Lookup.
func (d *exportDir) lookup(name string) (*nbdserver.Export, func(), error) {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return nil, nil, fmt.Errorf("export %q refused: not a file name in the export directory", name)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	e := d.open[name]
	if e == nil {
		img, err := qcow2.Open(filepath.Join(d.dir, name), d.opts)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil, nil, fmt.Errorf("export %q not available", name)
			}
			// The details (paths of the server's files) go to the
			// server's log, not to the client.
			d.logf("export %q: %v", name, err)
			return nil, nil, fmt.Errorf("export %q cannot be opened", name)
		}
		e = &dirExport{exp: &nbdserver.Export{Name: name, Image: img, Writable: d.writable}}
		d.open[name] = e
	}
	e.refs++
	var once sync.Once
	return e.exp, func() { once.Do(func() { d.release(name, e) }) }, nil
}

// release ends one use of e; the last one closes its image.
func (d *exportDir) release(name string, e *dirExport) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e.refs--; e.refs > 0 {
		return
	}
	delete(d.open, name)
	if err := e.exp.Image.Close(); err != nil {
		d.logf("closing export %q: %v", name, err)
	}
}

// list is nbdserver.Config.List: the directory's regular files, sorted.
func (d *exportDir) list() []nbdserver.ExportInfo {
	ents, err := os.ReadDir(d.dir)
	if err != nil {
		d.logf("--export-dir: %v", err)
		return nil
	}
	var out []nbdserver.ExportInfo
	for _, de := range ents {
		if de.Type().IsRegular() {
			out = append(out, nbdserver.ExportInfo{Name: de.Name()})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
