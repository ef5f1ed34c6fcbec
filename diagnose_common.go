package fuseoverlayfs

// Status of one finding of Diagnose.
type Status string

// The statuses a finding can have: ok (nothing to do), warn (the snapshotter
// runs, but something should be changed) and fail (the snapshotter cannot
// run here until the fix is applied).
const (
	StatusOK   Status = "ok"
	StatusWarn Status = "warn"
	StatusFail Status = "fail"
)

// Finding is the result of one host check of Diagnose.
type Finding struct {
	// Check names the check; the names are stable (see README, "check").
	Check string `json:"check"`
	// Status is ok, warn or fail.
	Status Status `json:"status"`
	// Found says what the check found.
	Found string `json:"found"`
	// Fix says what to do; empty when there is nothing to do.
	Fix string `json:"fix,omitempty"`
}

// The names of Diagnose's checks, in the order it runs them.
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
