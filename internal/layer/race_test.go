package layer

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

// raceLower is the lower layer of TestMetadataRace: directories the top
// layer lists again (kept) or implies (Finish copies their metadata), and
// files it hard-links to (copied up, or linked by Finish).
func raceLower(n int) []ent {
	var es []ent
	for i := range n {
		es = append(es,
			dir(fmt.Sprintf("d%d", i)).withMode(0o755),
			dir(fmt.Sprintf("m%d", i)).withMode(0o705).owned(5, 5).withXattr("user.m", "1"),
			withCap(file(fmt.Sprintf("t%d", i), "lower").withMode(0o4755).owned(3, 3), capNetBind))
	}
	return es
}

// raceTop is the layer applied while names are swapped: per group a kept
// directory, a new one, a symlink, a FIFO, a hard link to a lower file and
// a link to the symlink, each with its own metadata; then files below the
// new and the implied directories (Finish copies the latter's metadata).
// It returns the entries, the names the top-level entries make in tar
// order, and every name.
func raceTop(n int) ([]ent, []string, []string) {
	var es, kids []ent
	var order, names []string
	for i := range n {
		d, nd, s, p, h, hs, m := fmt.Sprintf("d%d", i), fmt.Sprintf("n%d", i), fmt.Sprintf("s%d", i), fmt.Sprintf("p%d", i),
			fmt.Sprintf("h%d", i), fmt.Sprintf("hs%d", i), fmt.Sprintf("m%d", i)
		es = append(es,
			dir(d).withMode(0o751).owned(1000+i%7, 2000).withXattr("user.d", "1"),
			dir(nd).withMode(0o700).owned(11, 12).withXattr("user.n", "1"),
			symlink(s, nd).owned(15, 16),
			ent{name: p, typ: tar.TypeFifo, mode: 0o640, uid: 17, gid: 18},
			hardlink(h, fmt.Sprintf("t%d", i)).withMode(0o700).owned(19, 20),
			hardlink(hs, s).owned(21, 22))
		kids = append(kids, file(nd+"/f", "new").withMode(0o600).owned(13, 14), file(m+"/f", "implied").withMode(0o644))
		order = append(order, d, nd, s, p, h, hs)
		names = append(names, d, nd, s, p, h, hs, nd+"/f", m, m+"/f")
	}
	return append(es, kids...), order, names
}

// TestMetadataRace: while Apply (sequential, or detached and then Finish)
// writes a layer, another goroutine keeps swapping the layer's names for
// symlinks to the decoy tree outside it (and back). Whatever Apply and
// Finish return, nothing outside the layer changes, bit for bit: the
// decoys' types, modes, owners, times, xattrs and contents, and the lower
// layer. Only this invariant is asserted, never that a swap landed in a
// window (the count of swaps is logged). Against the code before
// metadata went through handles (03f14b5), RACE_GROUPS=1000 saw a decoy's
// mode changed by a chmod that followed a swapped-in symlink.
func TestMetadataRace(t *testing.T) {
	testutil.RequireRoot(t)
	rounds := envInt(t, "RACE_ROUNDS", 4)
	groups := envInt(t, "RACE_GROUPS", 600)
	h := newHarness(t)
	s, err := prepareSandbox(h.sandboxDir(), 2)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	forms := FallbackForms
	lower := tarBytes(t, raceLower(groups))
	if err := Apply(ctx, s.dirs[0], bytes.NewReader(lower), Options{Forms: &forms}); err != nil {
		t.Fatal(err)
	}
	top, order, names := raceTop(groups)
	data := tarBytes(t, top)
	targets := raceTargets(h.sandboxDir())
	// Control: without swaps the layer applies.
	if err := Apply(ctx, s.dirs[1], bytes.NewReader(data), Options{Forms: &forms, Lowers: s.lowers(1)}); err != nil {
		t.Fatalf("the layer does not apply even without swaps: %v", err)
	}

	if err := freezeAtimes(s.root); err != nil {
		t.Fatal(err)
	}
	before, err := snapshotTree(s.root)
	if err != nil {
		t.Fatal(err)
	}
	forceMetaCalls(t, metaCalls.Load())
	var swaps, failed int64
	for round := range rounds {
		detached := round%2 == 1
		if round >= 2 {
			forms = h.forms["privileged"] // device whiteouts: the fast link path too
		}
		// Both forms of metadata calls, each with both modes and forms.
		metaCalls.Store(metaForms[((round+1)>>1)&1].calls)
		if err := resetLayer(s, 1); err != nil {
			t.Fatal(err)
		}
		opts := Options{Forms: &forms, Lowers: s.lowers(1)}
		if detached {
			opts = Options{Forms: &forms, Detached: true, StateFile: s.state(1)}
		}
		ops := []func() error{func() error { return Apply(ctx, s.dirs[1], bytes.NewReader(data), opts) }}
		if detached {
			ops = append(ops, func() error { return Finish(ctx, s.dirs[1], s.state(1), s.lowers(1)) })
		}
		for _, op := range ops {
			n, err := swapping(s.dirs[1], order, names, targets, round, func() error {
				ferr, setupErr := inChroot(s.root, 5*time.Minute, op)
				if setupErr != nil {
					t.Fatal(setupErr)
				}
				return ferr
			})
			swaps += n
			if err != nil {
				failed++
				t.Logf("round %d (detached %v): %v", round, detached, err)
				break // Finish needs a successful apply
			}
		}
	}
	after, err := snapshotTree(s.root)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range compareSnaps(before, after, 1) {
		t.Errorf("outside the layer: %s", d)
	}
	t.Logf("%d rounds of %d entries, %d swaps, %d rounds stopped by an error", rounds, len(top), swaps, failed)
}

// raceTargets are the decoys swapped-in symlinks point to, by absolute and
// by relative path (from a name of depth 1 or 2 in the layer), in both
// the sandbox and its decoy directory.
func raceTargets(sandbox string) []string {
	var out []string
	for _, e := range []string{"a", "a/d", "c", "d", "fifo", "null", "suid", "sym"} {
		out = append(out, filepath.Join(sandbox, "decoy", e), filepath.Join(sandbox, e),
			"../../../decoy/"+e, "../../../../decoy/"+e, "../../../"+e)
	}
	return out
}

// resetLayer empties layer i of s and removes its state file.
func resetLayer(s *stack, i int) error {
	if err := os.RemoveAll(s.dirs[i]); err != nil {
		return err
	}
	if err := os.Remove(s.state(i)); err != nil && !os.IsNotExist(err) {
		return err
	}
	return os.Mkdir(s.dirs[i], 0o755)
}

// swapping runs fn while a goroutine swaps names in layer for symlinks to
// targets and back: first it chases the names of order as they appear (a
// name is swapped right after it is made and held until the next one
// appears, when the applier sets its metadata), then it swaps random names.
// It returns how many swaps were made and fn's error.
func swapping(layer string, order, names, targets []string, seed int, fn func() error) (int64, error) {
	var n atomic.Int64
	stop := make(chan struct{})
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		r := rand.New(rand.NewPCG(uint64(seed), 19))
		for i, name := range order {
			next := ""
			if i+1 < len(order) {
				next = filepath.Join(layer, order[i+1])
			}
			if stopped() {
				return
			}
			if chaseOnce(filepath.Join(layer, name), next, targets[r.IntN(len(targets))], stopped) {
				n.Add(1)
			}
		}
		for !stopped() {
			if swapOnce(filepath.Join(layer, names[r.IntN(len(names))]), targets[r.IntN(len(targets))]) {
				n.Add(1)
			}
		}
	}()
	err := fn()
	close(stop)
	wg.Wait()
	return n.Load(), err
}

// chaseOnce waits for p to appear (giving up once next is there: the
// applier is past p) and swaps it, holding the symlink until next appears.
// The symlink is made first, so that the swap follows the creation of p
// by one rename.
func chaseOnce(p, next, target string, stopped func() bool) bool {
	aside := p + ".swapped"
	_ = os.RemoveAll(aside)
	if os.Symlink(target, aside) != nil {
		return false
	}
	for unix.Renameat2(unix.AT_FDCWD, aside, unix.AT_FDCWD, p, unix.RENAME_EXCHANGE) != nil {
		if stopped() || (next != "" && exists(next)) {
			_ = os.Remove(aside)
			return false
		}
	}
	holdAndRestore(p, aside, next)
	return true
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// swapOnce atomically exchanges p with a symlink to target (p is never
// missing), yields, and exchanges them back.
func swapOnce(p, target string) bool {
	aside := p + ".swapped"
	_ = os.RemoveAll(aside)
	if os.Symlink(target, aside) != nil {
		return false
	}
	if unix.Renameat2(unix.AT_FDCWD, aside, unix.AT_FDCWD, p, unix.RENAME_EXCHANGE) != nil {
		_ = os.Remove(aside)
		return false
	}
	holdAndRestore(p, aside, "")
	return true
}

// holdAndRestore keeps the swapped-in symlink at p until until appears (at
// most a bounded number of looks; "" yields once), then exchanges back
// (whatever the applier made meanwhile at either name goes: it is in the
// layer).
func holdAndRestore(p, aside, until string) {
	if until == "" {
		runtime.Gosched()
	}
	for i := 0; until != "" && i < 2000 && !exists(until); i++ {
	}
	if unix.Renameat2(unix.AT_FDCWD, aside, unix.AT_FDCWD, p, unix.RENAME_EXCHANGE) == nil {
		_ = os.Remove(aside)
	} else {
		_ = os.RemoveAll(aside)
	}
}
