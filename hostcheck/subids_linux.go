//go:build linux

package hostcheck

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"
)

// subordinateIDs reports, for a user other than root, the ranges
// /etc/subuid and /etc/subgid give it: rootless containers with more than
// one ID need at least 65536.
func subordinateIDs(*state) result {
	if os.Geteuid() == 0 {
		return result{} // does not apply
	}
	name := strconv.Itoa(os.Geteuid())
	if u, err := user.LookupId(name); err == nil {
		name = u.Username
	}
	uids := subIDCount("/etc/subuid", name, os.Geteuid())
	gids := subIDCount("/etc/subgid", name, os.Getegid())
	found := fmt.Sprintf("user %s has %d subordinate uids and %d subordinate gids", name, uids, gids)
	if uids >= 65536 && gids >= 65536 {
		return ok(found)
	}
	return warn(found, "images with files of other owners need ranges of 65536: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 "+name)
}

// subIDCount sums the ranges of the file (name:start:count lines) that
// belong to the user, by name or by number.
func subIDCount(path, name string, id int) uint64 {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	var n uint64
	s := bufio.NewScanner(bytes.NewReader(data))
	for s.Scan() {
		f := strings.Split(strings.TrimSpace(s.Text()), ":")
		if len(f) != 3 || (f[0] != name && f[0] != strconv.Itoa(id)) {
			continue
		}
		if c, err := strconv.ParseUint(f[2], 10, 32); err == nil {
			n += c
		}
	}
	return n
}
