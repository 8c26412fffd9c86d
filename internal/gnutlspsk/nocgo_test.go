//go:build !cgo

package gnutlspsk

import (
	"errors"
	"testing"
)

// TestNoCgo: without cgo Load refuses, before reading the file.
func TestNoCgo(t *testing.T) {
	if _, err := Load("/nonexistent"); !errors.Is(err, ErrNoCgo) {
		t.Errorf("Load: %v, want %v", err, ErrNoCgo)
	}
}
