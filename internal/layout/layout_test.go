package layout

import (
	"reflect"
	"testing"
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
		got, ok := Parse(Overlay(tc.want.Lowers, tc.want.Upper, tc.want.Work, append(extra, "noacl")...))
		if !ok || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: parsed %+v, %v; want %+v", tc.name, got, ok, tc.want)
		}
	}
	for _, rw := range []bool{true, false} {
		got, ok := Parse(Bind(r.FS("7"), rw))
		if want := (Mount{Bind: true, Source: r.FS("7"), RW: rw}); !ok || !reflect.DeepEqual(got, want) {
			t.Errorf("bind rw=%v: parsed %+v, %v; want %+v", rw, got, ok, want)
		}
	}
	if _, ok := Parse(Bind(r.FS("7"), true)); !ok {
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
	if _, ok := Parse(Overlay(lowers, "", "")); !ok {
		t.Error("overlay not parsed")
	}
	if _, ok := Parse(Overlay(lowers, "", "")); ok && UnpackState(r.Snapshot("5")) != "/var/lib/fo/snapshots/5/unpack-state.json" {
		t.Errorf("unpack state at %s", UnpackState(r.Snapshot("5")))
	}
}
