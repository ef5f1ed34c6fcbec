package fuseoverlayfs

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
)

// maxIDRanges bounds the number of ranges in one mapping label; the kernel
// allows at most 340 lines in a uid_map, so more can never be meaningful.
const maxIDRanges = 340

// IDRange is one contiguous range of an ID mapping: IDs ContainerID to
// ContainerID+Size-1 as seen in the container are HostID to HostID+Size-1
// on the host.
type IDRange struct {
	ContainerID uint32
	HostID      uint32
	Size        uint32
}

// ParseIDMapping parses the value of containerd's ID-mapping snapshot labels
// (containerd.io/snapshot/uidmapping and .../gidmapping): comma-separated
// ranges of the form container:host:size, all decimal. It refuses empty
// ranges, ranges that reach ID 4294967295 ((uid_t)-1, which the kernel refuses
// in an ID map) or beyond on either side, and ranges that overlap on either
// side, with an error of class errdefs.ErrInvalidArgument.
func ParseIDMapping(value string) ([]IDRange, error) {
	if value == "" {
		return nil, fmt.Errorf("empty ID mapping: %w", errdefs.ErrInvalidArgument)
	}
	parts := strings.Split(value, ",")
	if len(parts) > maxIDRanges {
		return nil, fmt.Errorf("ID mapping has %d ranges, at most %d are allowed: %w", len(parts), maxIDRanges, errdefs.ErrInvalidArgument)
	}
	ranges := make([]IDRange, 0, len(parts))
	for i, part := range parts {
		fields := strings.Split(part, ":")
		if len(fields) != 3 {
			return nil, fmt.Errorf("ID mapping range %d %q: want container:host:size: %w", i+1, part, errdefs.ErrInvalidArgument)
		}
		var nums [3]uint32
		for j, f := range fields {
			n, err := parseID(f)
			if err != nil {
				return nil, fmt.Errorf("ID mapping range %d %q: %w: %w", i+1, part, errdefs.ErrInvalidArgument, err)
			}
			nums[j] = n
		}
		r := IDRange{ContainerID: nums[0], HostID: nums[1], Size: nums[2]}
		if r.Size == 0 {
			return nil, fmt.Errorf("ID mapping range %d %q: size must be at least 1: %w", i+1, part, errdefs.ErrInvalidArgument)
		}
		// The last ID is start+size-1; ranges reaching (uid_t)-1 or beyond
		// 32 bits are both refused.
		for _, side := range []struct {
			name  string
			start uint32
		}{{"container", r.ContainerID}, {"host", r.HostID}} {
			if uint64(side.start)+uint64(r.Size)-1 >= math.MaxUint32 {
				return nil, fmt.Errorf("ID mapping range %d %q: the %s side reaches ID %d ((uid_t)-1, which the kernel refuses in an ID map; the highest usable ID is %d): %w",
					i+1, part, side.name, uint32(math.MaxUint32), uint32(math.MaxUint32-1), errdefs.ErrInvalidArgument)
			}
		}
		for k, prev := range ranges {
			if overlaps(prev.ContainerID, prev.Size, r.ContainerID, r.Size) {
				return nil, fmt.Errorf("ID mapping range %d %q overlaps range %d on the container side: %w", i+1, part, k+1, errdefs.ErrInvalidArgument)
			}
			if overlaps(prev.HostID, prev.Size, r.HostID, r.Size) {
				return nil, fmt.Errorf("ID mapping range %d %q overlaps range %d on the host side: %w", i+1, part, k+1, errdefs.ErrInvalidArgument)
			}
		}
		ranges = append(ranges, r)
	}
	return ranges, nil
}

// parseID accepts plain decimal digits only. strconv.ParseUint in base 10
// already refuses signs, spaces, '_' and prefixes; its error is kept as the
// cause (strconv.ErrSyntax or strconv.ErrRange).
func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	switch {
	case errors.Is(err, strconv.ErrRange):
		return 0, fmt.Errorf("%q is out of range for a 32-bit ID: %w", s, err)
	case err != nil:
		return 0, fmt.Errorf("%q is not a decimal number: %w", s, err)
	}
	return uint32(n), nil
}

func overlaps(a, an, b, bn uint32) bool {
	return uint64(a) < uint64(b)+uint64(bn) && uint64(b) < uint64(a)+uint64(an)
}

// fuseMapping renders ranges in fuse-overlayfs' own form: the triples
// container:host:size joined by ':'. fuse-overlayfs shows a file stored with
// the first ID as the second, which is exactly the label's direction.
func fuseMapping(ranges []IDRange) string {
	var b strings.Builder
	for i, r := range ranges {
		if i > 0 {
			b.WriteByte(':')
		}
		fmt.Fprintf(&b, "%d:%d:%d", r.ContainerID, r.HostID, r.Size)
	}
	return b.String()
}

// idMapOptions turns the ID-mapping labels of a snapshot into fuse-overlayfs
// options. The raw label never reaches the options: it is parsed and
// re-rendered, so nothing but digits and ':' can get in.
func idMapOptions(labels map[string]string) ([]string, error) {
	var opts []string
	for _, l := range []struct{ label, option string }{
		{snapshots.LabelSnapshotUIDMapping, "uidmapping="},
		{snapshots.LabelSnapshotGIDMapping, "gidmapping="},
	} {
		v, ok := labels[l.label]
		if !ok {
			continue
		}
		ranges, err := ParseIDMapping(v)
		if err != nil {
			return nil, fmt.Errorf("label %s: %w", l.label, err)
		}
		opts = append(opts, l.option+fuseMapping(ranges))
	}
	return opts, nil
}
