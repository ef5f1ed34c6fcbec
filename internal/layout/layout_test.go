package layout

import (
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
)

// TestMountRoundTrip: what Bind and Overlay build, Parse reads back, and
// the layer directories in it are found by LayerID.
func TestMountRoundTrip(t *testing.T) {
	r := Root("/var/lib/fo")
	lowers := []string{r.FS("3"), r.FS("2"), r.FS("1")}
	for _, tc := range []struct {
		name string
		in   Mount
		want Mount
	}{
		{"active overlay", Mount{}, Mount{Upper: r.FS("4"), Work: r.Work("4"), Lowers: lowers}},
		{"view overlay", Mount{}, Mount{Lowers: lowers}},
		{"id-mapped", Mount{}, Mount{Upper: r.FS("4"), Work: r.Work("4"), Lowers: []string{r.Empty()}, IDMapped: true}},
	} {
		var extra []string
		if tc.want.IDMapped {
			extra = []string{"uidmapping=0:1000:1", "gidmapping=0:1000:1"}
		}
		got, ok, err := Parse(Overlay(tc.want.Lowers, tc.want.Upper, tc.want.Work, append(extra, "noacl", "squash_to_uid=5")...))
		if !ok || err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: parsed %+v, %v, %v; want %+v", tc.name, got, ok, err, tc.want)
		}
	}
	for _, rw := range []bool{true, false} {
		got, ok, _ := Parse(Bind(r.FS("7"), rw))
		if want := (Mount{Bind: true, Source: r.FS("7"), RW: rw}); !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("bind rw=%v: parsed %+v, %v; want %+v", rw, got, ok, want)
		}
	}
	if _, ok, _ := Parse(Bind(r.FS("7"), true)); !ok {
		t.Error("bind not parsed")
	}
	for p, want := range map[string]string{
		r.FS("12"):                         "12",
		r.FS("12") + "/":                   "12",
		"/var/lib/fo/snapshots/12/work":    "",
		"/var/lib/fo/snapshots/x1/fs":      "",
		"/var/lib/fo/snapshots/12/fs/deep": "",
		"/var/lib/fo/snapshots/../12/fs":   "",
		"relative/snapshots/12/fs":         "",
		"/var/lib/other/snapshots/12/fs":   "",
	} {
		id, ok := r.LayerID(p)
		if id != want || ok != (want != "") {
			t.Errorf("LayerID(%q) = %q, %v; want %q", p, id, ok, want)
		}
	}
	if _, ok, _ := Parse(Overlay(lowers, "", "")); !ok {
		t.Error("overlay not parsed")
	}
	if _, ok, _ := Parse(Overlay(lowers, "", "")); ok && UnpackState(r.Snapshot("5")) != "/var/lib/fo/snapshots/5/unpack-state.json" {
		t.Errorf("unpack state at %s", UnpackState(r.Snapshot("5")))
	}
}

// TestParseRefusesSmuggling: an overlay option that the mount helper would
// read differently from one element at a time, or that Overlay never
// writes, is refused as invalid, naming the option.
func TestParseRefusesSmuggling(t *testing.T) {
	r := Root("/var/lib/fo")
	lower, upper, work := "lowerdir="+r.FS("3"), "upperdir="+r.FS("4"), "workdir="+r.Work("4")
	for _, tc := range []struct {
		name string
		bad  string   // the option the error must name
		opts []string // the mount's options, bad among them
	}{
		{"smuggled upper in uidmapping", "uidmapping=0:0:65536,upperdir=/elsewhere/fs,workdir=/elsewhere/work", nil},
		{"smuggled in an extra", "noacl,upperdir=/elsewhere/fs", nil},
		{"smuggled lower", "lowerdir=" + r.FS("3") + ",lowerdir=/etc", []string{upper, work}},
		{"trailing comma", "noacl,", nil},
		{"backslash escape", `noacl\,upperdir=/x`, nil},
		{"control character", "noacl\nupperdir=/x", nil},
		{"repeated upperdir", "upperdir=/elsewhere/fs", []string{lower, upper, work}},
		{"repeated extra", "noacl", []string{lower, upper, work, "noacl"}},
		{"repeated uidmapping", "uidmapping=0:0:1", []string{lower, upper, work, "uidmapping=0:0:1"}},
		{"unknown key", "plugins=/tmp/evil.so", nil},
		{"setuid helper option", "setuid=nobody", nil},
		{"bad key", "no acl", nil},
		{"empty option", "", nil},
		{"mapping not digits", "gidmapping=0:0:1:x", nil},
		{"empty mapping", "uidmapping=", nil},
		{"relative upper", "upperdir=snapshots/4/fs", []string{lower, work}},
		{"relative work", "workdir=./w", []string{lower, upper}},
		{"relative lower", "lowerdir=" + r.FS("3") + ":l", []string{upper, work}},
		{"dotdot upper", "upperdir=" + r.FS("4") + "/../../../../../../etc", []string{lower, work}},
		{"dotdot lower", "lowerdir=" + r.Snapshots() + "/../x", []string{upper, work}},
		{"trailing slash upper", "upperdir=" + r.FS("4") + "/", []string{lower, work}},
		{"empty lower", "lowerdir=" + r.FS("3") + "::" + r.FS("2"), []string{upper, work}},
		{"colon in work", "workdir=/a:b", []string{lower, upper}},
	} {
		opts := tc.opts
		if opts == nil {
			opts = []string{lower, upper, work}
		}
		opts = append(append([]string{}, opts...), tc.bad)
		_, ok, err := Parse(mount.Mount{Type: MountType, Source: "overlay", Options: opts})
		if !ok || !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.bad)) {
			t.Errorf("%s: Parse(%q) = %v, %v; want ErrInvalidArgument naming %q", tc.name, opts, ok, err, tc.bad)
		}
	}
	for name, opts := range map[string][]string{
		"no lowerdir":           {upper, work},
		"upperdir without work": {lower, upper},
		"workdir without upper": {lower, work},
	} {
		if _, ok, err := Parse(mount.Mount{Type: MountType, Source: "overlay", Options: opts}); !ok || !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: Parse(%q) = %v, %v; want ErrInvalidArgument", name, opts, ok, err)
		}
	}
	// Foreign mount types are not ours, and not an error.
	if _, ok, err := Parse(mount.Mount{Type: "overlay", Options: []string{"upperdir=/x,workdir=/y"}}); ok || err != nil {
		t.Errorf("overlay type: %v, %v; want not ours", ok, err)
	}
}
