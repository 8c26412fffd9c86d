package kernel

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/pmorjan/kmod"
	"golang.org/x/sys/unix"
)

// loadModule loads the nbd module found under root (normally
// /lib/modules) with github.com/pmorjan/kmod. The returned error explains
// why nbd cannot be had; it wraps ErrNotSupported when the kernel has no
// loadable nbd module at all.
func loadModule(root string) error {
	release := kernelRelease()
	dir := filepath.Join(root, release)
	k, err := kmod.New(kmod.SetRootDir(root), kmod.SetInitFunc(initModule))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%w: the generic netlink family %q is not registered and there is no module index %s to load the nbd module from (kernel %s)",
				ErrNotSupported, familyName, filepath.Join(dir, "modules.dep"), release)
		}
		return fmt.Errorf("loading the nbd module: %w", err)
	}
	err = k.Load(moduleName, "", 0)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, kmod.ErrModuleNotFound):
		return fmt.Errorf("%w: the generic netlink family %q is not registered and kernel %s has no nbd module in %s",
			ErrNotSupported, familyName, release, dir)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("loading the nbd module: %w (need root, or module loading is disabled: run 'modprobe nbd' first)", err)
	}
	return fmt.Errorf("loading the nbd module: %w", err)
}

// initModule loads one module file. Compressed modules (Debian 13 ships
// nbd.ko.xz) are handed to finit_module with MODULE_INIT_COMPRESSED_FILE
// for the kernel to decompress (CONFIG_MODULE_DECOMPRESS); plain ones
// fall back to init_module where finit_module is missing.
func initModule(path, params string, flags int) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	flags |= moduleFlags(path)
	err = unix.FinitModule(int(f.Fd()), params, flags)
	if errors.Is(err, unix.ENOSYS) && flags == 0 {
		fi, serr := f.Stat()
		if serr != nil {
			return serr
		}
		if fi.Size() > maxModuleSize {
			return fmt.Errorf("%s: %d bytes is too large for a module", path, fi.Size())
		}
		buf := make([]byte, fi.Size())
		if _, err := io.ReadFull(f, buf); err != nil {
			return err
		}
		return unix.InitModule(buf, params)
	}
	if err != nil && flags&unix.MODULE_INIT_COMPRESSED_FILE != 0 && errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("%s: %w (the kernel cannot decompress modules itself: decompress it or run modprobe nbd)", path, err)
	}
	return err
}

// maxModuleSize bounds the buffer of the init_module fallback.
const maxModuleSize = 64 << 20

// moduleFlags returns the finit_module flags a module file needs.
func moduleFlags(path string) int {
	for _, ext := range []string{".ko.xz", ".ko.zst", ".ko.gz"} {
		if strings.HasSuffix(path, ext) {
			return unix.MODULE_INIT_COMPRESSED_FILE
		}
	}
	return 0
}

func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}
