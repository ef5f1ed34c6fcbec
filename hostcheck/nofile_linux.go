//go:build linux

package hostcheck

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/layout"
)

// minOpenFiles is the RLIMIT_NOFILE under which the open-files check warns.
// One fuse-overlayfs server serves a whole container: it holds a descriptor
// for every file and directory any process of the container has open through
// the mount, plus one per layer and the directories it is looking up in
// them. containerd gives each container process a limit of 1024 by default,
// so a server at 1024 runs out before a single busy process does, and EMFILE
// then reaches the container on files it never opened itself. 65536 leaves
// room for dozens of such processes (a database, a build, a language server)
// and is well below what a systemd service gets (hard limit 524288 since
// systemd 240; containerd's own unit keeps that default). Hosts under it
// have usually run `ulimit -n 1024`, which lowers the hard limit too, or a
// sandbox or PAM set a low hard limit.
const minOpenFiles = 65536

// openFiles checks the open-files limit the servers get: the probe server's
// when the probe mount ran, else this process's hard limit, which every
// server inherits.
func openFiles(st *state) result {
	n := st.info.OpenFiles
	if st.status[CheckProbeMount] != StatusOK {
		n = hardNoFile()
	}
	switch {
	case n == 0:
		return warn("cannot read RLIMIT_NOFILE", "")
	case n < minOpenFiles:
		return warn(fmt.Sprintf("fuse-overlayfs servers will run with at most %d open files (RLIMIT_NOFILE: they raise their soft limit to the hard limit they inherit), under the recommended %d: containers with many open files will get EMFILE (too many open files)", n, minOpenFiles),
			"raise the limit of containerd (or of containerd-fuse-overlayfs-grpc): LimitNOFILE=1048576 in its systemd unit, or ulimit -n 1048576 before starting it")
	}
	return ok("fuse-overlayfs servers get RLIMIT_NOFILE " + limitString(n))
}

func hardNoFile() uint64 {
	var lim unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_NOFILE, &lim) != nil {
		return 0
	}
	return lim.Max
}

func limitString(n uint64) string {
	if n == unix.RLIM_INFINITY {
		return "unlimited"
	}
	return strconv.FormatUint(n, 10)
}

// serverOpenFiles returns the open-files limit of the fuse-overlayfs process
// serving target. fuse-overlayfs raises its soft limit to the hard one at
// start, so this is what every server the snapshotter starts gets, whatever
// containerd's own soft limit. When the server cannot be found (a /proc that
// hides other processes), it falls back to this process's hard limit.
func serverOpenFiles(target string) uint64 {
	if n, found := fuseServerLimit(target); found {
		return n
	}
	return hardNoFile()
}

// fuseServerLimit finds the fuse-overlayfs process whose command line names
// target and reads its soft RLIMIT_NOFILE.
func fuseServerLimit(target string) (uint64, bool) {
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		cmd, err := os.ReadFile(filepath.Join(p, "cmdline"))
		if err != nil || !bytes.Contains(cmd, []byte(target)) {
			continue
		}
		argv0, _, _ := bytes.Cut(cmd, []byte{0})
		if filepath.Base(string(argv0)) != layout.ServerComm {
			continue
		}
		if n, err := softOpenFiles(filepath.Join(p, "limits")); err == nil {
			return n, true
		}
	}
	return 0, false
}

// softOpenFiles reads the soft "Max open files" value of a /proc/PID/limits
// file; "unlimited" is the largest value.
func softOpenFiles(path string) (uint64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := bufio.NewScanner(bytes.NewReader(data))
	for s.Scan() {
		rest, found := strings.CutPrefix(s.Text(), "Max open files")
		if !found {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			break
		}
		if fields[0] == "unlimited" {
			return unix.RLIM_INFINITY, nil
		}
		return strconv.ParseUint(fields[0], 10, 64)
	}
	return 0, fmt.Errorf("no open-files limit in %s", path)
}
