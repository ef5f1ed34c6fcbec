// Package hostcheck tells whether a host can run the fuse-overlayfs
// snapshotter, and what to fix when it cannot. One table of checks (name,
// probe, fix) serves both readers: Require, which the containerd plugin and
// containerd-fuse-overlayfs-grpc run before opening a root (the checks marked
// for load time; the first failure is an error), and Run, which the `check`
// subcommand prints (every check, one finding each).
package hostcheck

import (
	"errors"
	"fmt"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// Status of one finding.
type Status string

// The statuses a finding can have: ok (nothing to do), warn (the snapshotter
// runs, but something should be changed) and fail (the snapshotter cannot
// run here until the fix is applied).
const (
	StatusOK   Status = "ok"
	StatusWarn Status = "warn"
	StatusFail Status = "fail"
)

// Finding is the result of one check.
type Finding struct {
	// Check names the check; the names are stable (docs/operating.md).
	Check string `json:"check"`
	// Status is ok, warn or fail.
	Status Status `json:"status"`
	// Found says what the check found.
	Found string `json:"found"`
	// Fix says what to do; empty when there is nothing to do.
	Fix string `json:"fix,omitempty"`
}

// The names of the checks, in the order they run.
const (
	CheckFuseOverlayfs   = "fuse-overlayfs"
	CheckMountHelper     = "mount-helper"
	CheckFuseDevice      = "fuse-device"
	CheckProbeMount      = "probe-mount"
	CheckWhiteoutForms   = "whiteout-forms"
	CheckOpenFiles       = "open-files"
	CheckSubordinateIDs  = "subordinate-ids"
	CheckKernelOverlayfs = "kernel-overlayfs"
)

// Info is what the checks found about the host's tools.
type Info struct {
	// FuseOverlayfs is the path of the fuse-overlayfs program on PATH.
	FuseOverlayfs string
	// Version is what fuse-overlayfs reports as its version, e.g. "1.10".
	Version string
	// MountHelper is the path of the mount.fuse3 helper on PATH.
	MountHelper string
	// OpenFiles is the open-files limit (RLIMIT_NOFILE) the probe's
	// fuse-overlayfs server ran with; every server the snapshotter starts
	// gets the same. 0 when it could not be read.
	OpenFiles uint64
}

// ErrUnsupported is wrapped by every error Require returns. Those errors are
// also of class errdefs.ErrFailedPrecondition (the host must be changed, as
// the message says, before the snapshotter can run), or
// errdefs.ErrNotImplemented on a system other than Linux, and wrap what
// failed, so callers can match e.g. exec.ErrNotFound or fs.ErrPermission.
var ErrUnsupported = errors.New("fuse-overlayfs snapshotter cannot run on this host")

// check is one row of the table.
type check struct {
	name string
	// atLoad: Require runs it; a failure stops the snapshotter from loading
	// and a warning is logged.
	atLoad bool
	// needs names the checks that must pass for this one to be tried.
	needs []string
	// run probes the host. A result with an empty status does not apply
	// here and is left out.
	run func(*state) result
}

// result is a finding and, for a failure, what caused it.
type result struct {
	Finding
	cause error
	// class is the errdefs class of Require's error; failed precondition
	// when nil.
	class error
}

// state is what one pass over the table shares between checks.
type state struct {
	root   string
	info   Info
	status map[string]Status
}

// Require runs the load-time checks in order for a snapshotter rooted at
// root and returns what they found. The first failure is returned as an
// error wrapping ErrUnsupported that says what was found and how to fix it;
// a warning is logged. The probes leave nothing behind in root.
func Require(root string) (Info, error) {
	st := newState(root)
	for _, c := range table {
		if !c.atLoad {
			continue
		}
		r := st.try(c)
		switch r.Status {
		case StatusFail:
			return st.info, r.err()
		case StatusWarn:
			l := log.L.WithField("check", r.Check)
			if r.Fix != "" {
				l = l.WithField("fix", r.Fix)
			}
			l.Warn(r.Found)
		}
	}
	return st.info, nil
}

// Run runs every check of the table for a snapshotter rooted at root and
// returns one finding per check that applies to this host and user. A check
// whose prerequisite failed is reported as failed, saying which. Root is
// created when missing (as the snapshotter would); no mount is left behind.
func Run(root string) []Finding {
	prepareRoot(root)
	st := newState(root)
	var out []Finding
	for _, c := range table {
		if r := st.try(c); r.Status != "" {
			out = append(out, r.Finding)
		}
	}
	return out
}

// Worst is the worst status of findings: fail over warn over ok.
func Worst(findings []Finding) Status {
	worst := StatusOK
	for _, f := range findings {
		if f.Status == StatusFail || (f.Status == StatusWarn && worst == StatusOK) {
			worst = f.Status
		}
	}
	return worst
}

func newState(root string) *state {
	return &state{root: root, status: map[string]Status{}}
}

// try runs c unless a check it needs did not pass.
func (st *state) try(c check) result {
	var r result
	if failed := st.failed(c.needs); len(failed) > 0 {
		r = fail(nil, "not tried: "+strings.Join(failed, ", ")+" failed", "fix the checks above first")
	} else {
		r = c.run(st)
	}
	r.Check = c.name
	st.status[c.name] = r.Status
	return r
}

func (st *state) failed(names []string) []string {
	var out []string
	for _, n := range names {
		if st.status[n] != StatusOK && st.status[n] != StatusWarn {
			out = append(out, n)
		}
	}
	return out
}

func ok(found string) result { return result{Finding: Finding{Status: StatusOK, Found: found}} }

func warn(found, fix string) result {
	return result{Finding: Finding{Status: StatusWarn, Found: found, Fix: fix}}
}

func fail(cause error, found, fix string) result {
	return result{Finding: Finding{Status: StatusFail, Found: found, Fix: fix}, cause: cause}
}

// err is Require's error for a failed result: ErrUnsupported, what was
// found, the fix, the class and the cause.
func (r result) err() error {
	class := r.class
	if class == nil {
		class = errdefs.ErrFailedPrecondition
	}
	msg := fmt.Sprintf("%s: %s", r.Check, r.Found)
	if r.Fix != "" {
		msg += ": " + r.Fix
	}
	if r.cause == nil {
		return fmt.Errorf("%w: %s: %w", ErrUnsupported, msg, class)
	}
	return fmt.Errorf("%w: %s: %w: %w", ErrUnsupported, msg, class, r.cause)
}
