package qcow2

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Image locks: QEMU's file-posix protocol (block/file-posix.c), so that
// nbdgw and QEMU processes exclude each other exactly as two QEMU processes
// do. See the package documentation, "Image locking", for the design.

// Permissions, QEMU's BLK_PERM_* bits (include/block/block-common.h). Bit i
// is represented by byte lockPermBase+i (held) and lockSharedBase+i (not
// shared) of the file.
const (
	permConsistentRead uint64 = 1 << iota
	permWrite
	permWriteUnchanged
	permResize
	permAll = permConsistentRead | permWrite | permWriteUnchanged | permResize

	numPerms = 4
)

// RAW_LOCK_PERM_BASE and RAW_LOCK_SHARED_BASE: libvirt takes byte 0.
const (
	lockPermBase   = 100
	lockSharedBase = 200
)

// permNames are QEMU's bdrv_perm_names(), which its lock errors print.
var permNames = [numPerms]string{"consistent read", "write", "write unchanged", "resize"}

// ErrLocked is what an open refused because another process (or another
// open of this process) holds an incompatible image lock wraps.
var ErrLocked = errors.New("image is locked")

// LockError says which lock could not be had on which file and, when it can
// be found in /proc, which process holds the conflicting byte.
type LockError struct {
	File string
	// Perm is QEMU's name of the permission; Shared is true when the
	// conflict is that another process holds a permission we do not
	// share (QEMU: Failed to get shared "write" lock), false when another
	// process does not share one we need (Failed to get "write" lock).
	Perm   string
	Shared bool
	// Byte is set instead of Perm when the lock byte itself could not be
	// taken (another process holds it exclusively: not QEMU's protocol).
	Byte   int
	Holder string // e.g. "qemu-nbd (pid 1234)"; "" when not found
}

func (e *LockError) Error() string {
	kind := ""
	if e.Shared {
		kind = "shared "
	}
	holder := "held by another process"
	if e.Holder != "" {
		holder = "held by " + e.Holder
	}
	what := fmt.Sprintf("get %s%q lock", kind, e.Perm)
	if e.Perm == "" {
		what = fmt.Sprintf("lock byte %d", e.Byte)
	}
	return fmt.Sprintf("%s: Failed to %s, %s. Is another process using the image [%s]?", e.File, what, holder, e.File)
}

func (e *LockError) Unwrap() error { return ErrLocked }

// lockRole is how the chain uses a file, which decides its locks.
type lockRole uint8

const (
	roleTop     lockRole = iota // the opened image
	roleBacking                 // a backing file (also the chain under a snapshot overlay)
	roleForce                   // any file of a force-share open
)

// lockSpec is the permissions a file is opened with and those it shares
// with other users.
type lockSpec struct {
	perm, shared uint64
}

// lockFor is what QEMU 10.0 takes on a chain file, as measured from
// qemu-nbd, qemu-io and qemu-img (see lock_test.go, which compares):
//
//   - qcow2, opened image: consistent read (+ write and resize when
//     writable); never shares write or resize (bdrv_default_perms_for_storage:
//     metadata must not change under the format driver).
//   - raw, opened image: consistent read (+ write when writable); shares
//     everything but resize (an NBD export has a fixed size).
//   - qcow2 backing file: consistent read, shares all but write and resize.
//   - raw backing file: consistent read, shares everything.
//   - force share: consistent read, shares everything.
func lockFor(format string, writable bool, role lockRole) lockSpec {
	switch {
	case role == roleForce:
		return lockSpec{permConsistentRead, permAll}
	case format == "raw" && role == roleBacking:
		return lockSpec{permConsistentRead, permAll}
	case format == "raw" && writable:
		return lockSpec{permConsistentRead | permWrite, permAll &^ permResize}
	case format == "raw":
		return lockSpec{permConsistentRead, permAll &^ permResize}
	case writable:
		return lockSpec{permConsistentRead | permWrite | permResize, permAll &^ (permWrite | permResize)}
	}
	return lockSpec{permConsistentRead, permAll &^ (permWrite | permResize)}
}

// dataFileLock is what QEMU takes on an external data file (nbdgw opens
// data files read-only): consistent read, shares all but resize.
func dataFileLock(role lockRole) lockSpec {
	if role == roleForce {
		return lockSpec{permConsistentRead, permAll}
	}
	return lockSpec{permConsistentRead, permAll &^ permResize}
}

// chainRole is the lock role of the file at depth (1 = the opened image).
func chainRole(opts Options, depth int) lockRole {
	switch {
	case opts.ForceShare:
		return roleForce
	case depth > 1 || opts.snapshotBase:
		return roleBacking
	}
	return roleTop
}

// checkForceShare refuses force-share with writes, as QEMU does
// ("force-share=on can only be used with read-only images").
func checkForceShare(path string, opts Options) error {
	if opts.ForceShare && (opts.Writable || opts.Snapshot) {
		return fmt.Errorf("%s: force-share (-U) can only be used with read-only images: it cannot be combined with --writable or --snapshot", path)
	}
	return nil
}

var (
	ofdOnce sync.Once
	ofdOK   bool
)

// haveOFD probes for open file description locks as QEMU's
// qemu_probe_lock_ops() does: F_OFD_GETLK on /dev/null.
func haveOFD() bool {
	ofdOnce.Do(func() {
		fd, err := unix.Open("/dev/null", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return
		}
		defer unix.Close(fd)
		fl := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0}
		ofdOK = unix.FcntlFlock(uintptr(fd), unix.F_OFD_GETLK, &fl) == nil
	})
	return ofdOK
}

// lock takes s on h as raw_handle_perm_lock() does at open: first the
// bytes (shared locks on 100+i for each permission held and 200+i for each
// permission not shared), then the check that no other open file
// description holds a byte that conflicts: 200+i for a permission we want,
// 100+i for one we do not share. On failure every byte is unlocked again.
// Without OFD locks the file is left unlocked, as QEMU's locking=auto does
// (with a warning, which QEMU does not print).
func (h *hostFile) lock(s lockSpec, warn func(string)) error {
	if !haveOFD() {
		warn(h.name + ": file locking unavailable (no OFD locks): the image is not locked against other processes")
		return nil
	}
	err := h.applyLocks(s)
	if err == nil {
		err = h.checkLocks(s)
	}
	if err != nil {
		h.unlockAll()
		return err
	}
	return nil
}

func (h *hostFile) applyLocks(s lockSpec) error {
	for i := 0; i < numPerms; i++ {
		bit := uint64(1) << i
		if s.perm&bit != 0 {
			if err := h.setlk(lockPermBase+i, unix.F_RDLCK); err != nil {
				return err
			}
		}
	}
	for i := 0; i < numPerms; i++ {
		bit := uint64(1) << i
		if s.shared&bit == 0 {
			if err := h.setlk(lockSharedBase+i, unix.F_RDLCK); err != nil {
				return err
			}
		}
	}
	return nil
}

func (h *hostFile) checkLocks(s lockSpec) error {
	for i := 0; i < numPerms; i++ {
		if s.perm&(1<<i) != 0 {
			if err := h.testlk(lockSharedBase+i, permNames[i], false); err != nil {
				return err
			}
		}
	}
	for i := 0; i < numPerms; i++ {
		if s.shared&(1<<i) == 0 {
			if err := h.testlk(lockPermBase+i, permNames[i], true); err != nil {
				return err
			}
		}
	}
	return nil
}

// unlockAll drops every lock byte of h (QEMU's RAW_PL_ABORT from nothing).
func (h *hostFile) unlockAll() {
	fl := unix.Flock_t{Type: unix.F_UNLCK, Whence: 0, Start: lockPermBase, Len: lockSharedBase + numPerms - lockPermBase}
	fcntlLock(h.f.Fd(), unix.F_OFD_SETLK, &fl)
}

func (h *hostFile) setlk(off int, typ int16) error {
	fl := unix.Flock_t{Type: typ, Whence: 0, Start: int64(off), Len: 1}
	if err := fcntlLock(h.f.Fd(), unix.F_OFD_SETLK, &fl); err != nil {
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return &LockError{File: h.name, Byte: off, Holder: h.holder(off)}
		}
		return fmt.Errorf("%s: Failed to lock byte %d: %w", h.name, off, err)
	}
	return nil
}

// testlk reports a *LockError if an open file description other than h's
// holds byte off (an exclusive lock there would conflict).
func (h *hostFile) testlk(off int, perm string, shared bool) error {
	fl := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: int64(off), Len: 1}
	if err := fcntlLock(h.f.Fd(), unix.F_OFD_GETLK, &fl); err != nil {
		return fmt.Errorf("%s: Failed to test lock byte %d: %w", h.name, off, err)
	}
	if fl.Type == unix.F_UNLCK {
		return nil
	}
	return &LockError{File: h.name, Perm: perm, Shared: shared, Holder: h.holder(off)}
}

func fcntlLock(fd uintptr, cmd int, fl *unix.Flock_t) error {
	for {
		err := unix.FcntlFlock(fd, cmd, fl)
		if err != unix.EINTR {
			return err
		}
	}
}

// fdLock is one "lock:" line of /proc/PID/fdinfo/FD.
type fdLock struct {
	file       string // "MAJ:MIN:INODE", the kernel's spelling
	start, end int64  // end is -1 for EOF
}

func (l fdLock) covers(off int) bool {
	return int64(off) >= l.start && (l.end < 0 || int64(off) <= l.end)
}

// parseFdinfoLocks parses lines like
// "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10093759 100 101".
func parseFdinfoLocks(text string) []fdLock {
	var out []fdLock
	for _, line := range strings.Split(text, "\n") {
		rest, ok := strings.CutPrefix(line, "lock:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 8 {
			continue
		}
		start, err := strconv.ParseInt(f[6], 10, 64)
		if err != nil {
			continue
		}
		end := int64(-1)
		if f[7] != "EOF" {
			if end, err = strconv.ParseInt(f[7], 10, 64); err != nil {
				continue
			}
		}
		out = append(out, fdLock{file: f[5], start: start, end: end})
	}
	return out
}

// holder names the process holding byte off of h's file, from the lock
// lines of /proc/*/fdinfo (only processes we may inspect are found).
func (h *hostFile) holder(off int) string {
	var st unix.Stat_t
	if err := unix.Fstat(int(h.f.Fd()), &st); err != nil {
		return ""
	}
	key := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	self, ownFd := os.Getpid(), int(h.f.Fd())
	dirs, _ := filepath.Glob("/proc/[0-9]*/fdinfo")
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(filepath.Dir(d)))
		if err != nil {
			continue
		}
		ents, err := os.ReadDir(d)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if pid == self && e.Name() == strconv.Itoa(ownFd) {
				continue
			}
			if fdinfoHolds(filepath.Join(d, e.Name()), key, off) {
				return describePid(pid, self)
			}
		}
	}
	return ""
}

func fdinfoHolds(path, key string, off int) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var text strings.Builder
	s := bufio.NewScanner(f)
	for s.Scan() {
		if strings.HasPrefix(s.Text(), "lock:") {
			text.WriteString(s.Text() + "\n")
		}
	}
	for _, l := range parseFdinfoLocks(text.String()) {
		if l.file == key && l.covers(off) {
			return true
		}
	}
	return false
}

func describePid(pid, self int) string {
	comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	name := strings.TrimSpace(string(comm))
	if name == "" {
		name = "process"
	}
	if pid == self {
		return fmt.Sprintf("another open in this process, %s (pid %d)", name, pid)
	}
	return fmt.Sprintf("%s (pid %d)", name, pid)
}
