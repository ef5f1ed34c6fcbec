package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
)

// checkReport is what `check --json` prints. Its fields are stable (README,
// "Is this host ready?"): new fields may be added, none renamed or removed.
type checkReport struct {
	// FormatVersion is 1; it changes only if a field changes meaning.
	FormatVersion int    `json:"format_version"`
	Root          string `json:"root"`
	UID           int    `json:"uid"`
	// Status is the worst status of the checks: ok, warn or fail.
	Status fuseoverlayfs.Status    `json:"status"`
	Checks []fuseoverlayfs.Finding `json:"checks"`
}

// runCheck is `containerd-fuse-overlayfs-grpc check [--root DIR] [--json]`:
// the plugin's host checks and a few more, one line each. Exit status 0 when
// every check is ok or warn, 1 when one failed, 2 for a bad command line.
func runCheck(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(name+" check", flag.ContinueOnError)
	fs.SetOutput(stderr)
	root := fs.String("root", defaultRoot(), "snapshotter root `directory` to check (created if missing)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	fs.Usage = func() {
		_, _ = fmt.Fprintf(fs.Output(), "usage: %s check [--root DIR] [--json]\n\nChecks whether this host can run the fuse-overlayfs snapshotter with its root at DIR.\nOne line per check: ok, warn or fail, what was found, and the fix.\nExit status: 0 all ok or warn, 1 a check failed, 2 bad usage.\n\nflags:\n", name)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return exitUsage
	}
	if fs.NArg() > 0 {
		_, _ = fmt.Fprintf(stderr, "%s check: unexpected arguments %q\n", name, fs.Args())
		return exitUsage
	}
	abs, err := filepath.Abs(*root)
	if err != nil {
		_, _ = fmt.Fprintf(stderr, "%s check: %v\n", name, err)
		return exitUsage
	}
	rep := checkReport{FormatVersion: 1, Root: abs, UID: os.Geteuid(), Status: fuseoverlayfs.StatusOK, Checks: fuseoverlayfs.Diagnose(abs)}
	for _, f := range rep.Checks {
		if f.Status == fuseoverlayfs.StatusFail || (f.Status == fuseoverlayfs.StatusWarn && rep.Status == fuseoverlayfs.StatusOK) {
			rep.Status = f.Status
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(rep)
	} else {
		for _, f := range rep.Checks {
			line := fmt.Sprintf("%-4s %-16s %s", f.Status, f.Check, f.Found)
			if f.Fix != "" {
				line += " -- fix: " + f.Fix
			}
			_, _ = fmt.Fprintln(stdout, line)
		}
	}
	if rep.Status == fuseoverlayfs.StatusFail {
		return exitFailure
	}
	return 0
}

// defaultRoot is where a containerd set up the usual way for this user
// keeps the plugin's snapshots (containerdRoot); empty when that cannot be
// told, and --root must be given.
func defaultRoot() string {
	dir, err := containerdRoot(os.Getenv, runningRootless())
	if err != nil {
		return ""
	}
	return filepath.Join(dir, "io.containerd.snapshotter.v1.fuse-overlayfs")
}
