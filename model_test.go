//go:build linux

package fuseoverlayfs

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// The model test drives the snapshotter with random operations and checks
// every answer against a plain in-memory model of what containerd expects.

type modelOp struct {
	Kind       string // prepare view commit remove update write stat usage walk mounts cleanup reopen
	Key        string
	Parent     string
	Name       string
	WithParent bool
	Filter     string
	Label      string
	Size       int
}

func (o modelOp) String() string {
	switch o.Kind {
	case "prepare", "view":
		return fmt.Sprintf("%s(%q, parent %q, label %q)", o.Kind, o.Key, o.Parent, o.Label)
	case "commit":
		if o.WithParent {
			return fmt.Sprintf("commit(%q as %q, WithParent(%q))", o.Key, o.Name, o.Parent)
		}
		return fmt.Sprintf("commit(%q as %q)", o.Key, o.Name)
	case "update":
		return fmt.Sprintf("update(%q, label %q)", o.Key, o.Label)
	case "write":
		return fmt.Sprintf("write(%q, %d bytes)", o.Key, o.Size)
	case "walk":
		return fmt.Sprintf("walk(%q)", o.Filter)
	case "cleanup", "reopen":
		return o.Kind + "()"
	}
	return fmt.Sprintf("%s(%q)", o.Kind, o.Key)
}

type modelSnap struct {
	kind   snapshots.Kind
	parent string
	label  string // value of label "m", "" when absent
	files  int
	bytes  int64
	usage  *snapshots.Usage // recorded at first look once committed
}

type model struct {
	snaps map[string]*modelSnap
}

func (m *model) depth(key string) int {
	d := 0
	for p := m.snaps[key].parent; p != ""; p = m.snaps[p].parent {
		d++
	}
	return d
}

func (m *model) hasChildren(key string) bool {
	for _, s := range m.snaps {
		if s.parent == key {
			return true
		}
	}
	return false
}

// errClass names the errdefs class of err, for comparing with the model.
func errClass(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errdefs.IsNotFound(err):
		return "not found"
	case errdefs.IsAlreadyExists(err):
		return "already exists"
	case errdefs.IsInvalidArgument(err):
		return "invalid argument"
	case errdefs.IsFailedPrecondition(err):
		return "failed precondition"
	}
	return "other: " + err.Error()
}

var modelNames = []string{"s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8", "s9", "s10", "s11"}

func randomOp(r *rand.Rand, m *model) modelOp {
	pick := func() string { return modelNames[r.Intn(len(modelNames))] }
	// Parents are mostly committed snapshots, so chains grow.
	parent := func() string {
		var committed []string
		for k, s := range m.snaps {
			if s.kind == snapshots.KindCommitted {
				committed = append(committed, k)
			}
		}
		slices.Sort(committed)
		switch n := r.Intn(10); {
		case n < 2:
			return ""
		case n < 8 && len(committed) > 0:
			return committed[r.Intn(len(committed))]
		default:
			return pick()
		}
	}
	label := func() string { return []string{"", "v1", "v2"}[r.Intn(3)] }
	switch n := r.Intn(100); {
	case n < 20:
		return modelOp{Kind: "prepare", Key: pick(), Parent: parent(), Label: label()}
	case n < 26:
		return modelOp{Kind: "view", Key: pick(), Parent: parent(), Label: label()}
	case n < 44:
		return modelOp{Kind: "commit", Key: pick(), Name: pick(), WithParent: r.Intn(3) == 0, Parent: parent()}
	case n < 56:
		return modelOp{Kind: "remove", Key: pick()}
	case n < 61:
		return modelOp{Kind: "update", Key: pick(), Label: label()}
	case n < 71:
		return modelOp{Kind: "write", Key: pick(), Size: r.Intn(20000)}
	case n < 77:
		return modelOp{Kind: "stat", Key: pick()}
	case n < 83:
		return modelOp{Kind: "usage", Key: pick()}
	case n < 90:
		filters := []string{"", "kind==committed", "kind==active", "kind==view", "parent==" + pick(), "name==" + pick(), `labels."m"==v1`}
		return modelOp{Kind: "walk", Filter: filters[r.Intn(len(filters))]}
	case n < 95:
		return modelOp{Kind: "mounts", Key: pick()}
	case n < 98:
		return modelOp{Kind: "cleanup"}
	default:
		return modelOp{Kind: "reopen"}
	}
}

// modelRun is one snapshotter under test with its model.
type modelRun struct {
	t     testing.TB
	root  string
	sn    *snapshotter
	ctx   context.Context
	model model
	async bool
}

func newModelRun(t testing.TB, async bool) *modelRun {
	root, err := os.MkdirTemp(t.TempDir(), "model-")
	if err != nil {
		t.Fatal(err)
	}
	r := &modelRun{t: t, root: root, async: async, ctx: namespaces.WithNamespace(context.Background(), "model"),
		model: model{snaps: map[string]*modelSnap{}}}
	if err := r.open(); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *modelRun) open() error {
	var opts []Opt
	if r.async {
		opts = append(opts, AsynchronousRemove)
	}
	s, err := NewSnapshotter(r.root, opts...)
	if err != nil {
		return err
	}
	r.sn = s.(*snapshotter)
	return nil
}

func (r *modelRun) close() { _ = r.sn.Close() }

func labelsOf(v string) map[string]string {
	if v == "" {
		return nil
	}
	return map[string]string{"m": v}
}

// step applies op to both and returns a description of any divergence.
func (r *modelRun) step(op modelOp) string {
	m, ctx, sn := &r.model, r.ctx, r.sn
	check := func(err error, want string) string {
		if got := errClass(err); got != want {
			return fmt.Sprintf("%v: got %s, model says %s", op, got, want)
		}
		return ""
	}
	switch op.Kind {
	case "prepare", "view":
		want := "ok"
		switch p, ok := m.snaps[op.Parent]; {
		case op.Parent != "" && !ok:
			want = "not found"
		case op.Parent != "" && p.kind != snapshots.KindCommitted:
			want = "invalid argument"
		case m.snaps[op.Key] != nil:
			want = "already exists"
		}
		var err error
		var opts []snapshots.Opt
		if op.Label != "" {
			opts = append(opts, snapshots.WithLabels(labelsOf(op.Label)))
		}
		kind := snapshots.KindActive
		if op.Kind == "prepare" {
			_, err = sn.Prepare(ctx, op.Key, op.Parent, opts...)
		} else {
			kind = snapshots.KindView
			_, err = sn.View(ctx, op.Key, op.Parent, opts...)
		}
		if d := check(err, want); d != "" || want != "ok" {
			return d
		}
		m.snaps[op.Key] = &modelSnap{kind: kind, parent: op.Parent, label: op.Label}
	case "commit":
		want := "ok"
		s := m.snaps[op.Key]
		var opts []snapshots.Opt
		if op.WithParent {
			opts = append(opts, snapshots.WithParent(op.Parent))
		}
		newParent := ""
		if s != nil {
			newParent = s.parent
		}
		switch {
		case s == nil:
			want = "not found"
		case s.kind != snapshots.KindActive:
			want = "failed precondition"
		case m.snaps[op.Name] != nil || op.Name == op.Key:
			want = "already exists"
		case op.WithParent && (op.Parent == op.Name || op.Parent == op.Key):
			want = "invalid argument"
		case op.WithParent && op.Parent != s.parent && s.parent != "" && op.Parent != "":
			want = "invalid argument"
		case op.WithParent && s.parent == "" && op.Parent != "":
			newParent = op.Parent
			if p := m.snaps[op.Parent]; p == nil {
				want = "not found"
			} else if p.kind != snapshots.KindCommitted {
				want = "failed precondition"
			}
		}
		if d := check(sn.Commit(ctx, op.Name, op.Key, opts...), want); d != "" || want != "ok" {
			return d
		}
		delete(m.snaps, op.Key)
		// Commit replaces labels; none are given here.
		m.snaps[op.Name] = &modelSnap{kind: snapshots.KindCommitted, parent: newParent, files: s.files, bytes: s.bytes}
	case "remove":
		want := "ok"
		if m.snaps[op.Key] == nil {
			want = "not found"
		} else if m.hasChildren(op.Key) {
			want = "failed precondition"
		}
		if d := check(sn.Remove(ctx, op.Key), want); d != "" || want != "ok" {
			return d
		}
		delete(m.snaps, op.Key)
	case "update":
		want := "ok"
		if m.snaps[op.Key] == nil {
			want = "not found"
		}
		info := snapshots.Info{Name: op.Key, Labels: labelsOf(op.Label)}
		got, err := sn.Update(ctx, info, "labels.m")
		if d := check(err, want); d != "" || want != "ok" {
			return d
		}
		m.snaps[op.Key].label = op.Label
		if got.Labels["m"] != op.Label {
			return fmt.Sprintf("%v: returned labels %v", op, got.Labels)
		}
	case "write":
		s := m.snaps[op.Key]
		if s == nil || s.kind != snapshots.KindActive {
			return ""
		}
		id, _, _, err := getInfo(ctx, sn, op.Key)
		if err != nil {
			return fmt.Sprintf("%v: %v", op, err)
		}
		name := filepath.Join(sn.root.FS(id), "f"+strconv.Itoa(s.files))
		if err := os.WriteFile(name, make([]byte, op.Size), 0o644); err != nil {
			return fmt.Sprintf("%v: %v", op, err)
		}
		s.files++
		s.bytes += int64(op.Size)
	case "stat":
		info, err := sn.Stat(ctx, op.Key)
		s := m.snaps[op.Key]
		if s == nil {
			return check(err, "not found")
		}
		if d := check(err, "ok"); d != "" {
			return d
		}
		if info.Name != op.Key || info.Kind != s.kind || info.Parent != s.parent || info.Labels["m"] != s.label {
			return fmt.Sprintf("%v: got %+v, model has %+v", op, info, *s)
		}
	case "usage":
		u, err := sn.Usage(ctx, op.Key)
		s := m.snaps[op.Key]
		if s == nil {
			return check(err, "not found")
		}
		if d := check(err, "ok"); d != "" {
			return d
		}
		if s.kind == snapshots.KindCommitted {
			if s.usage == nil {
				s.usage = &u
			} else if *s.usage != u {
				return fmt.Sprintf("%v: committed usage changed from %+v to %+v", op, *s.usage, u)
			}
		}
		if s.kind != snapshots.KindView && (u.Inodes != int64(s.files)+1 || u.Size < s.bytes) {
			return fmt.Sprintf("%v: got %+v, model has %d files of %d bytes", op, u, s.files, s.bytes)
		}
	case "walk":
		var got []string
		err := sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
			got = append(got, i.Name)
			return nil
		}, op.Filter)
		if d := check(err, "ok"); d != "" {
			return d
		}
		var want []string
		for k, s := range m.snaps {
			if modelMatch(op.Filter, k, s) {
				want = append(want, k)
			}
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			return fmt.Sprintf("%v: got %v, model has %v", op, got, want)
		}
	case "mounts":
		ms, err := sn.Mounts(ctx, op.Key)
		s := m.snaps[op.Key]
		if s == nil {
			return check(err, "not found")
		}
		if s.kind == snapshots.KindCommitted {
			return check(err, "failed precondition")
		}
		if d := check(err, "ok"); d != "" {
			return d
		}
		d := m.depth(op.Key)
		wantType := MountType
		if d == 0 || (s.kind == snapshots.KindView && d == 1) {
			wantType = "bind"
		}
		if len(ms) != 1 || ms[0].Type != wantType {
			return fmt.Sprintf("%v: got %+v, want one %s mount (chain depth %d)", op, ms, wantType, d)
		}
		if wantType == MountType && strings.Count(ms[0].Options[0], ":")+1 != d {
			return fmt.Sprintf("%v: lowerdir %q does not have %d layers", op, ms[0].Options[0], d)
		}
	case "cleanup":
		if d := check(sn.Cleanup(ctx), "ok"); d != "" {
			return d
		}
		return r.checkDirs(op)
	case "reopen":
		r.close()
		if err := r.open(); err != nil {
			return fmt.Sprintf("%v: %v", op, err)
		}
		// Opening recovers the root: only known directories remain.
		return r.checkDirs(op)
	}
	return ""
}

// checkDirs compares the snapshot directories with the model's snapshots.
func (r *modelRun) checkDirs(op modelOp) string {
	entries, err := os.ReadDir(r.sn.root.Snapshots())
	if err != nil {
		return fmt.Sprintf("%v: %v", op, err)
	}
	var want []string
	for k := range r.model.snaps {
		id, _, _, err := getInfo(r.ctx, r.sn, k)
		if err != nil {
			return fmt.Sprintf("%v: model has %q, store: %v", op, k, err)
		}
		want = append(want, id)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		return fmt.Sprintf("%v: directories %v, model's snapshots have IDs %v", op, got, want)
	}
	return ""
}

func modelMatch(filter, name string, s *modelSnap) bool {
	if filter == "" {
		return true
	}
	field, value, _ := strings.Cut(filter, "==")
	switch field {
	case "kind":
		return map[snapshots.Kind]string{snapshots.KindActive: "active", snapshots.KindView: "view", snapshots.KindCommitted: "committed"}[s.kind] == value
	case "parent":
		return s.parent == value
	case "name":
		return name == value
	case `labels."m"`:
		return s.label == value
	}
	return false
}

// replay runs ops on a fresh snapshotter and returns the index and text of
// the first divergence, or -1.
func replay(t testing.TB, async bool, ops []modelOp) (int, string) {
	r := newModelRun(t, async)
	defer r.close()
	for i, op := range ops {
		if d := r.step(op); d != "" {
			return i, d
		}
	}
	return -1, ""
}

// shrink removes chunks of a failing sequence while it still fails, to give
// the shortest failing sequence it can find within a bounded number of runs.
// fails returns the index of the first divergence, or -1.
func shrink(ops []modelOp, fails func([]modelOp) int) []modelOp {
	runs := 0
	for chunk := len(ops) / 2; chunk >= 1 && runs < 400; {
		removed := false
		for start := 0; start+chunk <= len(ops) && runs < 400; {
			try := append(slices.Clone(ops[:start]), ops[start+chunk:]...)
			runs++
			if i := fails(try); i >= 0 {
				ops = try[:i+1]
				removed = true
				continue
			}
			start += chunk
		}
		if !removed {
			chunk /= 2
		}
	}
	return ops
}

// TestModel checks 5,000 random operations (FOSNAP_MODEL_OPS to change)
// against the model, with synchronous and asynchronous remove. The seed is
// printed; FOSNAP_MODEL_SEED replays one.
func TestModel(t *testing.T) {
	seed := testutil.Seed(t, "FOSNAP_MODEL_SEED")
	n := 5000
	if s := os.Getenv("FOSNAP_MODEL_OPS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%d operations per mode", n)
	for _, async := range []bool{false, true} {
		t.Run(fmt.Sprintf("async=%v", async), func(t *testing.T) {
			rnd := rand.New(rand.NewSource(seed))
			r := newModelRun(t, async)
			defer r.close()
			var ops []modelOp
			counts := map[string]int{}
			for range n {
				op := randomOp(rnd, &r.model)
				ops = append(ops, op)
				counts[op.Kind]++
				if d := r.step(op); d != "" {
					r.close()
					short := shrink(ops, func(try []modelOp) int {
						i, _ := replay(t, async, try)
						return i
					})
					var lines []string
					for _, o := range short {
						lines = append(lines, "  "+o.String())
					}
					t.Fatalf("divergence after %d operations: %s\nshortest failing sequence found (%d operations):\n%s",
						len(ops), d, len(short), strings.Join(lines, "\n"))
				}
			}
			t.Logf("%d operations checked: %v; %d snapshots at the end", len(ops), counts, len(r.model.snaps))
		})
	}
}

// TestModelShrinks proves the shrinker cuts a long failing sequence down to
// the operations that matter.
func TestModelShrinks(t *testing.T) {
	rnd := rand.New(rand.NewSource(1))
	m := &model{snaps: map[string]*modelSnap{}}
	var ops []modelOp
	for range 300 {
		ops = append(ops, randomOp(rnd, m))
	}
	// A made-up fault: a stat of s5 after a write to s7 diverges.
	fails := func(seq []modelOp) int {
		wrote := false
		for i, o := range seq {
			if o.Kind == "write" && o.Key == "s7" {
				wrote = true
			}
			if wrote && o.Kind == "stat" && o.Key == "s5" {
				return i
			}
		}
		return -1
	}
	if fails(ops) < 0 {
		ops = append(ops, modelOp{Kind: "write", Key: "s7"}, modelOp{Kind: "stat", Key: "s5"})
	}
	short := shrink(ops, fails)
	if len(short) != 2 || fails(short) != 1 {
		t.Fatalf("shrunk to %v, want the write and the stat", short)
	}
}
