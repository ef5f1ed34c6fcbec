package layer

import (
	"archive/tar"
	"fmt"
	"math/rand/v2"
	"path"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
)

// A generator of hostile layer sequences for the containment tests. It is a
// small grammar over a tiny name alphabet so that names collide: a directory
// made in one entry is replaced by a symlink in the next, a hard link goes
// through the symlink, a whiteout lands below it. Every choice goes through a
// chooser: a PCG seeded from an int64 (TestContainment) or the fuzzer's bytes
// (FuzzContainment), so a sequence is reproducible from its seed or bytes.

// Name helpers of the tests' own: the package's may change.

const (
	tWh      = ".wh."
	tWhOpq   = ".wh..wh..opq"
	tMaxHops = 40 // symlinks followed in one resolution, as the kernel's MAXSYMLINKS
)

// tClean turns a tar name into a path relative to the root ("" the root).
func tClean(name string) string { return strings.TrimPrefix(path.Clean("/"+name), "/") }

func tJoin(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

func tSplit(rel string) []string {
	if rel == "" {
		return nil
	}
	return strings.Split(rel, "/")
}

func tParent(rel string) string {
	if i := strings.LastIndexByte(rel, '/'); i >= 0 {
		return rel[:i]
	}
	return ""
}

// tUnder tells whether p is dir or below it.
func tUnder(p, dir string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }

// chooser makes the generator's choices.
type chooser interface {
	// intn returns a choice in [0, n); 0 for n <= 1.
	intn(n int) int
}

type pcgChooser struct{ r *rand.Rand }

func newPCGChooser(seed int64) pcgChooser {
	return pcgChooser{rand.New(rand.NewPCG(uint64(seed), uint64(seed)^0x9e3779b97f4a7c15))}
}

func (c pcgChooser) intn(n int) int {
	if n <= 1 {
		return 0
	}
	return c.r.IntN(n)
}

// byteChooser takes its choices from fuzz bytes: one byte per choice (two,
// big-endian, for more than 256 options), 0 once the bytes run out, which
// the grammar reads as "stop" or "the simplest option".
type byteChooser struct {
	data []byte
	off  int
}

func (c *byteChooser) next() int {
	if c.off >= len(c.data) {
		return 0
	}
	b := c.data[c.off]
	c.off++
	return int(b)
}

func (c *byteChooser) intn(n int) int {
	if n <= 1 {
		return 0
	}
	v := c.next()
	if n > 256 {
		v = v<<8 | c.next()
	}
	return v % n
}

// byteWriter writes the bytes a byteChooser must read to make given choices.
type byteWriter struct{ b []byte }

func (w *byteWriter) choose(i, n int) {
	if i < 0 || i >= max(n, 1) {
		panic(fmt.Sprintf("choice %d out of [0,%d)", i, n))
	}
	switch {
	case n <= 1:
	case n <= 256:
		w.b = append(w.b, byte(i))
	default:
		w.b = append(w.b, byte(i>>8), byte(i))
	}
}

// recordingChooser makes a PCG's choices and writes them as bytes, so a
// generated sequence can seed the fuzzer's corpus.
type recordingChooser struct {
	c pcgChooser
	w byteWriter
}

func (c *recordingChooser) intn(n int) int {
	i := c.c.intn(n)
	c.w.choose(i, n)
	return i
}

// Placeholders in link targets, replaced at run time (substitute): the
// absolute path of the decoy directory and of the sandbox around the layers.
const (
	phDecoy   = "@DECOY@"
	phSandbox = "@SANDBOX@"
)

// The vocabulary. Tables repeat their ordinary values to weigh them; the
// encoder uses the first occurrence.
var (
	gComps = []string{"a", "b", "c", "d"}
	// Prefixes a name may be spelled with (all must stay in the layer).
	gPrefixes = []string{"", "", "", "", "", "", "/", "./", "../", "../../", "a/../", "a/./", "//", "../../../../"}
	// Hostile symlink targets: up-level chains, absolute ones, the decoy
	// by relative and absolute path.
	gSymTargets = []string{
		"..", "../..", "../../..", "../../../..", "../../../../..", "../../../../../../../..",
		"../a", "../b", "../../a", "a/../../..", "b/../../../..", "./a/..", "a/b/../../..", ".",
		"/", "/a", "/b", "/a/b", "/..", "/../..",
		"/decoy", "/decoy/a", "../../../decoy", "../../../../decoy", "../../../a", "../../../b",
		phDecoy, phDecoy + "/a", phDecoy + "/c", phSandbox, phSandbox + "/a", phSandbox + "/snapshots",
	}
	// Hostile hard link targets.
	gLinkTargets = []string{
		"../../../decoy/a/d", "/decoy/a/d", "../../../d", "../../../../d", phDecoy + "/a/d",
		phSandbox + "/d", "../../../snapshots/1/fs/a", "/snapshots/1/fs/a", "../../../suid", "/decoy/suid",
	}
	gModes  = []int64{0o755, 0o644, 0o755, 0o644, 0o777, 0, 0o4755, 0o2755, 0o1777, 0o7777, 0o700, 0o600, 0o6711}
	gOwners = [][2]int{{0, 0}, {0, 0}, {0, 0}, {1234, 5678}, {65534, 65534}, {1, 2}}
	// Xattrs of entries: none, ordinary, and hostile ones (overlay markers
	// in every namespace fuse-overlayfs or the kernel read).
	gXattrs = []map[string]string{
		nil, nil, nil, nil, nil, nil,
		{"user.foo": "bar"},
		{"trusted.overlay.opaque": "y"},
		{"user.fuseoverlayfs.opaque": "y"},
		{"user.fuseoverlayfs.override_stat": "0:0:04755"},
		{"user.overlay.opaque": "y"},
		{"user.overlay.redirect": "/decoy"},
		{"trusted.overlay.redirect": "/decoy"},
		{"trusted.foo": "bar"},
		{"user.fuseoverlayfs.origin": "x"},
		{"user.overlay.whiteout": "y"},
	}
	gBodies = []string{"", "data", "other content\n"}
)

// Entry kinds; the table repeats some to weigh them.
const (
	kDir = iota
	kFile
	kSym
	kLink
	kFifo
	kChr13
	kChr00
	kBlk
	kWhiteout
	kOpaque
)

var gKinds = []int{kDir, kDir, kDir, kFile, kFile, kFile, kFile, kSym, kSym, kSym, kLink, kLink, kLink, kWhiteout, kWhiteout, kOpaque, kFifo, kChr13, kChr00, kBlk}

// Productions; the table repeats some to weigh them. pLiteral is index 0.
const (
	pLiteral = iota
	pReplace
	pImplied
	pThrough
	pChain
	pSwap
)

var gProds = []int{pLiteral, pLiteral, pLiteral, pLiteral, pLiteral, pLiteral, pReplace, pReplace, pImplied, pThrough, pThrough, pChain, pSwap}

const (
	genMaxEntries = 25
	genStop       = 6 // 1 in genStop chance to end a layer after each production
	// Options of path, symTarget and linkTarget; the encoder always takes
	// the one numbered 1 (a fresh path, or the table).
	genPathOpts   = 8
	genTargetOpts = 8
	genMaxDepth   = 4 // names deeper than this are made again as children of the root
)

// nameSet is a set of names that remembers their order (picks must be
// deterministic).
type nameSet struct {
	order []string
	in    map[string]bool
}

func (s *nameSet) add(n string) {
	if s.in == nil {
		s.in = map[string]bool{}
	}
	if !s.in[n] {
		s.in[n] = true
		s.order = append(s.order, n)
	}
}

// removeUnder removes n and every name below it.
func (s *nameSet) removeUnder(n string) {
	kept := s.order[:0]
	for _, x := range s.order {
		if tUnder(x, n) {
			delete(s.in, x)
		} else {
			kept = append(kept, x)
		}
	}
	s.order = kept
}

func (s *nameSet) len() int { return len(s.order) }

// generator makes layers from choices. It keeps a rough model of what each
// name is (the symlinks in paths make it rough) so that most entries are
// valid: a layer aborts at its first refused entry, and entries after it,
// Finish and the comparison with containerd would go untested.
type generator struct {
	ch    chooser
	m     *extractModel
	used  nameSet // every name used, to collide with
	dirs  nameSet // names believed to be directories
	files nameSet // names believed to be regular files (hard link targets)
	links nameSet // names believed to be symlinks
}

// genLayers makes a sequence of 2 to 4 layers.
func genLayers(ch chooser) [][]ent {
	g := &generator{ch: ch, m: newExtractModel()}
	layers := make([][]ent, 2+ch.intn(3))
	for i := range layers {
		if i > 0 {
			g.m.nextLayer()
		}
		var l []ent
		for len(l) < genMaxEntries && ch.intn(genStop) != 0 {
			for _, e := range g.production() {
				if g.keep(e) {
					l = append(l, e)
				}
			}
		}
		if len(l) > genMaxEntries {
			l = l[:genMaxEntries]
		}
		layers[i] = l
	}
	return layers
}

func (g *generator) pick(n int) int { return g.ch.intn(n) }

// genKeepRefused: 1 in genKeepRefused entries the model says containerd
// would refuse are kept (the layer then stops there, for us and for it).
const genKeepRefused = 12

// keep decides whether e goes into the layer. It always makes one choice
// (0 keeps, what the encoder writes), so the bytes stay aligned.
func (g *generator) keep(e ent) bool {
	keepRefused := g.pick(genKeepRefused) == 0
	trial := g.m.clone()
	if trial.apply(e) {
		g.m = trial
		return true
	}
	return keepRefused
}

func (g *generator) comp() string { return gComps[g.pick(len(gComps))] }

// path is a name: mostly a new child of a known directory, or a fresh
// path of any depth (its parents implied), a name used before, a child of
// a symlink, an existing file (to replace). Never deeper than genMaxDepth
// (deep names mostly meet a file or a symlink loop on the way).
func (g *generator) path() string {
	p, ok := "", false
	switch g.pick(genPathOpts) {
	case 1:
		comps := make([]string, g.pick(5))
		for i := range comps {
			comps[i] = g.comp()
		}
		return strings.Join(comps, "/")
	case 2:
		if g.used.len() > 0 {
			p, ok = g.used.order[g.pick(g.used.len())], true
		}
	case 3:
		if g.links.len() > 0 {
			p, ok = tJoin(g.links.order[g.pick(g.links.len())], g.comp()), true
		}
	case 4:
		if g.files.len() > 0 {
			p, ok = g.files.order[g.pick(g.files.len())], true
		}
	}
	if !ok {
		parent := ""
		if i := g.pick(g.dirs.len() + 1); i > 0 {
			parent = g.dirs.order[i-1]
		}
		p = tJoin(parent, g.comp())
	}
	if strings.Count(p, "/") >= genMaxDepth {
		p = g.comp()
	}
	return p
}

// dirPath is a known directory, or the root.
func (g *generator) dirPath() string {
	if i := g.pick(g.dirs.len() + 1); i > 0 {
		return g.dirs.order[i-1]
	}
	return ""
}

// symTarget is where a symlink at from points: mostly a known directory
// (by absolute or relative path), or a hostile target from the table, or
// a fresh path.
func (g *generator) symTarget(from string) string {
	switch g.pick(genTargetOpts) {
	case 1:
		if i := g.pick(len(gSymTargets) + 1); i < len(gSymTargets) {
			return gSymTargets[i]
		}
		return g.path()
	case 2, 3:
		return gSymTargets[g.pick(len(gSymTargets))]
	}
	d := g.dirPath()
	if g.pick(2) == 0 {
		return "/" + d
	}
	rel, err := filepath.Rel("/"+tParent(from), "/"+d)
	if err != nil {
		return "/" + d
	}
	return rel
}

// linkTarget is the target of a hard link: mostly a known file, or a
// hostile target from the table, or a fresh path.
func (g *generator) linkTarget() string {
	switch g.pick(genTargetOpts) {
	case 1:
		if i := g.pick(len(gLinkTargets) + 1); i < len(gLinkTargets) {
			return gLinkTargets[i]
		}
		return g.path()
	case 2:
		return gLinkTargets[g.pick(len(gLinkTargets))]
	}
	if g.files.len() == 0 {
		return g.comp()
	}
	return g.files.order[g.pick(g.files.len())]
}

// literal is one entry; every field is chosen in a fixed order whatever the
// kind, so that hand-written entries can be encoded (encodeLayers). Names are
// put below under when it is not "".
func (g *generator) literal(under string) ent {
	kind := gKinds[g.pick(len(gKinds))]
	p := g.path()
	if p == "" {
		p = under
	} else {
		p = tJoin(under, p)
	}
	prefix := gPrefixes[g.pick(len(gPrefixes))]
	slash := g.pick(2) == 1
	sym := g.symTarget(p)
	link := g.linkTarget()
	base := g.comp()
	mode := gModes[g.pick(len(gModes))]
	owner := gOwners[g.pick(len(gOwners))]
	xattrs := gXattrs[g.pick(len(gXattrs))]
	body := gBodies[g.pick(len(gBodies))]
	return g.makeEnt(kind, p, prefix, slash, sym, link, base, mode, owner, xattrs, body)
}

func (g *generator) makeEnt(kind int, p, prefix string, slash bool, sym, link, base string, mode int64, owner [2]int, xattrs map[string]string, body string) ent {
	if p == "" && kind != kWhiteout && kind != kOpaque {
		p = gComps[0] // the root itself: a tar cannot name it as a non-directory
	}
	name := prefix + p
	var e ent
	switch kind {
	case kDir:
		if slash {
			name += "/"
		}
		e = dir(name).withMode(mode)
	case kFile:
		e = file(name, body).withMode(mode)
	case kSym:
		e = symlink(name, sym)
	case kLink:
		e = hardlink(name, link).withMode(mode)
	case kFifo:
		e = ent{name: name, typ: tar.TypeFifo, mode: mode}
	case kChr13:
		e = ent{name: name, typ: tar.TypeChar, mode: mode}.withDev(1, 3)
	case kChr00:
		e = ent{name: name, typ: tar.TypeChar, mode: mode}
	case kBlk:
		e = ent{name: name, typ: tar.TypeBlock, mode: mode}.withDev(7, 0)
	case kDevWide:
		e = g.wideDev(name, mode, len(xattrs) > 0)
	case kWhiteout:
		e = file(prefix+tJoin(p, tWh+base), "")
	case kOpaque:
		e = file(prefix+tJoin(p, tWhOpq), "")
	}
	g.model(e)
	if kind == kWhiteout || kind == kOpaque {
		return e
	}
	e = e.owned(owner[0], owner[1])
	if len(xattrs) > 0 {
		e.xattrs = xattrs
	}
	return e
}

// model notes what entry e makes of the names.
func (g *generator) model(e ent) {
	rel := tClean(e.name)
	if rel == "" {
		return
	}
	parent, base := tParent(rel), rel[strings.LastIndexByte(rel, '/')+1:]
	for p := parent; p != ""; p = tParent(p) {
		g.dirs.add(p)
	}
	if base == tWhOpq {
		return
	}
	if strings.HasPrefix(base, tWh) {
		gone := tJoin(parent, strings.TrimPrefix(base, tWh))
		for _, s := range []*nameSet{&g.dirs, &g.files, &g.links} {
			s.removeUnder(gone)
		}
		return
	}
	g.used.add(rel)
	if e.typ == tar.TypeDir {
		if !g.dirs.in[rel] {
			g.files.removeUnder(rel)
			g.links.removeUnder(rel)
			g.dirs.add(rel)
		}
		return
	}
	for _, s := range []*nameSet{&g.dirs, &g.files, &g.links} {
		s.removeUnder(rel)
	}
	switch e.typ {
	case tar.TypeReg, tar.TypeLink:
		g.files.add(rel)
	case tar.TypeSymlink:
		g.links.add(rel)
	}
}

func (g *generator) production() []ent {
	switch gProds[g.pick(len(gProds))] {
	case pReplace:
		// The same name replaced several times in one layer (directory,
		// symlink, file), with entries below it between replacements.
		n := g.path()
		if n == "" {
			n = "a"
		}
		var out []ent
		for steps := 2 + g.pick(3); steps > 0; steps-- {
			var e ent
			below := g.pick(3)
			switch g.pick(3) {
			case 0:
				e = dir(n)
			case 1:
				e = symlink(n, g.symTarget(n))
			default:
				e, below = file(n, "r"), 0 // nothing can be below a file
			}
			g.model(e)
			out = append(out, e)
			for ; below > 0; below-- {
				out = append(out, g.literal(n))
			}
		}
		return out
	case pImplied:
		// A deep entry whose parents the tar does not list, and a hard link
		// to it.
		p := g.dirPath()
		for k := 2 + g.pick(2); k > 0; k-- {
			p = tJoin(p, g.comp())
		}
		out := []ent{file(p, "deep")}
		g.model(out[0])
		if g.pick(2) == 1 {
			out = append(out, hardlink(tJoin(tParent(p), "l"+g.comp()), p))
			g.model(out[1])
		}
		return out
	case pThrough:
		// A symlink, then entries through it.
		l := g.path()
		if l == "" {
			l = "a"
		}
		out := []ent{symlink(l, g.symTarget(l))}
		g.model(out[0])
		for k := 1 + g.pick(3); k > 0; k-- {
			var e ent
			switch g.pick(7) {
			case 0:
				e = file(tJoin(l, g.comp()), "through")
			case 1:
				e = hardlink(tJoin(l, g.comp()), g.linkTarget())
			case 2:
				e = hardlink(g.path(), tJoin(l, g.comp()))
			case 3:
				e = symlink(tJoin(l, g.comp()), g.symTarget(tJoin(l, "x")))
			case 4:
				e = whiteout(l, g.comp())
			case 5:
				e = dir(tJoin(l, g.comp()))
			default:
				e = opaque(l)
			}
			g.model(e)
			out = append(out, e)
		}
		return out
	case pChain:
		// Multi-hop symlink chain, then an entry through its first link.
		a, b := g.path(), g.path()
		if a == "" {
			a = "a"
		}
		if b == "" || b == a {
			b = a + "b"
		}
		out := []ent{symlink(b, g.symTarget(b)), symlink(a, b)}
		g.model(out[0])
		g.model(out[1])
		return append(out, g.literal(a))
	case pCapLink:
		return g.capLinks()
	case pSwap:
		// l -> x, l/f1, l replaced by another symlink (or a directory),
		// l/f2: the second entry must follow the new l.
		l := g.path()
		if l == "" {
			l = "a"
		}
		out := []ent{symlink(l, g.symTarget(l)), file(tJoin(l, "c"), "f1")}
		if g.pick(3) == 0 {
			out = append(out, dir(l))
		} else {
			out = append(out, symlink(l, g.symTarget(l)))
		}
		out = append(out, file(tJoin(l, "d"), "f2"))
		for _, e := range out {
			g.model(e)
		}
		return out
	default:
		return []ent{g.literal("")}
	}
}

// encodeLayers writes the bytes from which genLayers (with a byteChooser)
// makes exactly layers, each entry as a literal production. Every entry must
// be expressible in the vocabulary.
func encodeLayers(layers [][]ent) ([]byte, error) {
	var w byteWriter
	if len(layers) < 2 || len(layers) > 4 {
		return nil, fmt.Errorf("%d layers: the grammar makes 2 to 4", len(layers))
	}
	w.choose(len(layers)-2, 3)
	for li, l := range layers {
		if len(l) > genMaxEntries {
			return nil, fmt.Errorf("layer %d: %d entries, at most %d", li, len(l), genMaxEntries)
		}
		for _, e := range l {
			w.choose(1, genStop)
			w.choose(0, len(gProds)) // pLiteral
			if err := encodeLiteral(&w, e); err != nil {
				return nil, fmt.Errorf("layer %d entry %q: %w", li, e.name, err)
			}
			w.choose(0, genKeepRefused) // keep it
		}
		if len(l) < genMaxEntries {
			w.choose(0, genStop) // at the cap, genLayers stops by itself
		}
	}
	return w.b, nil
}

func indexOf[T any](list []T, v T) int {
	for i, x := range list {
		if reflect.DeepEqual(x, v) {
			return i
		}
	}
	return -1
}

func encodeLiteral(w *byteWriter, e ent) error {
	// Split the prefix off (longest first).
	name := e.name
	prefix := ""
	prefixes := append([]string(nil), gPrefixes[1:]...)
	sort.Slice(prefixes, func(i, j int) bool { return len(prefixes[i]) > len(prefixes[j]) })
	for _, p := range prefixes {
		if strings.HasPrefix(name, p) {
			prefix, name = p, strings.TrimPrefix(name, p)
			break
		}
	}
	var kind int
	slash := false
	base := "a"
	dirBase, last := path2(name)
	switch {
	case e.typ == tar.TypeReg && last == tWhOpq:
		kind, name = kOpaque, dirBase
	case e.typ == tar.TypeReg && strings.HasPrefix(last, tWh):
		kind, name, base = kWhiteout, dirBase, strings.TrimPrefix(last, tWh)
	case e.typ == tar.TypeDir:
		kind = kDir
		if strings.HasSuffix(name, "/") {
			slash, name = true, strings.TrimSuffix(name, "/")
		}
	case e.typ == tar.TypeReg:
		kind = kFile
	case e.typ == tar.TypeSymlink:
		kind = kSym
	case e.typ == tar.TypeLink:
		kind = kLink
	case e.typ == tar.TypeFifo:
		kind = kFifo
	case e.typ == tar.TypeChar && e.major == 1 && e.minor == 3:
		kind = kChr13
	case e.typ == tar.TypeChar && e.major == 0 && e.minor == 0:
		kind = kChr00
	case e.typ == tar.TypeBlock && e.major == 7 && e.minor == 0:
		kind = kBlk
	default:
		return fmt.Errorf("type %q not in the grammar", e.typ)
	}
	w.choose(indexOf(gKinds, kind), len(gKinds))
	// path: a fresh one, by depth and components.
	w.choose(1, genPathOpts)
	comps := tSplit(name)
	if len(comps) > 4 {
		return fmt.Errorf("name %q deeper than 4", name)
	}
	w.choose(len(comps), 5)
	for _, c := range comps {
		i := indexOf(gComps, c)
		if i < 0 {
			return fmt.Errorf("name component %q not in the alphabet %v", c, gComps)
		}
		w.choose(i, len(gComps))
	}
	w.choose(indexOf(gPrefixes, prefix), len(gPrefixes))
	w.choose(map[bool]int{false: 0, true: 1}[slash], 2)
	// symlink target, link target
	sym, link := "", ""
	switch kind {
	case kSym:
		sym = e.link
	case kLink:
		link = e.link
	}
	if err := encodeTarget(w, sym, gSymTargets); err != nil {
		return err
	}
	if err := encodeTarget(w, link, gLinkTargets); err != nil {
		return err
	}
	bi := indexOf(gComps, base)
	if bi < 0 {
		return fmt.Errorf("whiteout of %q: not in the alphabet", base)
	}
	w.choose(bi, len(gComps))
	mi := 0
	if kind != kSym && kind != kWhiteout && kind != kOpaque {
		if mi = indexOf(gModes, e.mode); mi < 0 {
			return fmt.Errorf("mode %o not in the grammar", e.mode)
		}
	}
	w.choose(mi, len(gModes))
	oi := indexOf(gOwners, [2]int{e.uid, e.gid})
	if oi < 0 {
		return fmt.Errorf("owner %d:%d not in the grammar", e.uid, e.gid)
	}
	w.choose(oi, len(gOwners))
	xi := 0
	if len(e.xattrs) > 0 {
		if xi = indexOf(gXattrs, e.xattrs); xi < 0 {
			return fmt.Errorf("xattrs %v not in the grammar", e.xattrs)
		}
	}
	w.choose(xi, len(gXattrs))
	body := 0
	if kind == kFile {
		if body = indexOf(gBodies, e.body); body < 0 {
			return fmt.Errorf("body %q not in the grammar", e.body)
		}
	}
	w.choose(body, len(gBodies))
	return nil
}

func encodeTarget(w *byteWriter, t string, table []string) error {
	w.choose(1, genTargetOpts)
	if i := indexOf(table, t); i >= 0 {
		w.choose(i, len(table)+1)
		return nil
	}
	w.choose(len(table), len(table)+1)
	w.choose(1, genPathOpts) // a fresh path
	comps := tSplit(t)
	if len(comps) > 4 || strings.Join(comps, "/") != t {
		return fmt.Errorf("target %q is neither in the table nor an alphabet path", t)
	}
	w.choose(len(comps), 5)
	for _, c := range comps {
		i := indexOf(gComps, c)
		if i < 0 {
			return fmt.Errorf("target %q: component %q not in the alphabet", t, c)
		}
		w.choose(i, len(gComps))
	}
	return nil
}

// path2 splits a name at its last slash.
func path2(name string) (string, string) {
	i := strings.LastIndexByte(name, '/')
	if i < 0 {
		return "", name
	}
	return name[:i], name[i+1:]
}

// substitute replaces the placeholders in link targets.
func substitute(layers [][]ent, decoy, sandbox string) [][]ent {
	out := make([][]ent, len(layers))
	for i, l := range layers {
		out[i] = make([]ent, len(l))
		for j, e := range l {
			e.link = strings.ReplaceAll(e.link, phDecoy, decoy)
			e.link = strings.ReplaceAll(e.link, phSandbox, sandbox)
			out[i][j] = e
		}
	}
	return out
}

// formatLayers shows a sequence as Go source, ready to paste as a case.
func formatLayers(layers [][]ent) string {
	var b strings.Builder
	b.WriteString("[][]ent{\n")
	for _, l := range layers {
		b.WriteString("\t{\n")
		for _, e := range l {
			b.WriteString("\t\t" + formatEnt(e) + ",\n")
		}
		b.WriteString("\t},\n")
	}
	b.WriteString("}")
	return b.String()
}

func formatEnt(e ent) string {
	var s string
	var defMode int64
	switch e.typ {
	case tar.TypeDir:
		s, defMode = fmt.Sprintf("dir(%q)", e.name), 0o755
	case tar.TypeReg:
		s, defMode = fmt.Sprintf("file(%q, %q)", e.name, e.body), 0o644
	case tar.TypeSymlink:
		s, defMode = fmt.Sprintf("symlink(%q, %q)", e.name, e.link), 0o777
	case tar.TypeLink:
		s, defMode = fmt.Sprintf("hardlink(%q, %q)", e.name, e.link), 0o644
	default:
		s = fmt.Sprintf("ent{name: %q, typ: %q, mode: 0o%o}", e.name, e.typ, e.mode)
		defMode = e.mode
		if e.major != 0 || e.minor != 0 {
			s += fmt.Sprintf(".withDev(%d, %d)", e.major, e.minor)
		}
	}
	if e.mode != defMode {
		s += fmt.Sprintf(".withMode(0o%o)", e.mode)
	}
	if e.uid != 0 || e.gid != 0 {
		s += fmt.Sprintf(".owned(%d, %d)", e.uid, e.gid)
	}
	keys := make([]string, 0, len(e.xattrs))
	for k := range e.xattrs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		s += fmt.Sprintf(".withXattr(%q, %q)", k, e.xattrs[k])
	}
	return s
}

// extractModel is an in-memory model of what containerd's extraction makes
// of a sequence in one directory, only to tell whether an entry would be
// refused (below a file, hard link to nothing, symlink loop, a directory
// whose times cannot be set at the end of its layer).
type extractModel struct {
	nodes   map[string]mnode
	layer   int
	dirEnts []string // directory entries of the current layer, as named
	// quirks are where containerd's extraction departs from the layer
	// format, or where an overlay cannot do as one directory does, so
	// that comparing with it would be wrong.
	quirks []string
	inos   int            // inode numbers given
	meta   map[int]string // metadata of each inode
}

type mnode struct {
	kind     byte // 'd' directory, 'l' symlink, 'f' anything else
	target   string
	layer    int
	implicit bool // a parent directory the extraction made (not an entry)
	ino      int  // shared by hard links
}

func newExtractModel() *extractModel {
	return &extractModel{nodes: map[string]mnode{}, meta: map[int]string{}}
}

func entMeta(e ent) string { return fmt.Sprint(e.mode, e.uid, e.gid, e.xattrs) }

func (m *extractModel) clone() *extractModel {
	c := &extractModel{nodes: make(map[string]mnode, len(m.nodes)), layer: m.layer, dirEnts: append([]string(nil), m.dirEnts...),
		quirks: m.quirks, inos: m.inos, meta: make(map[int]string, len(m.meta))}
	for k, v := range m.nodes {
		c.nodes[k] = v
	}
	for k, v := range m.meta {
		c.meta[k] = v
	}
	return c
}

func (m *extractModel) nextLayer() {
	m.layer++
	m.dirEnts = nil
}

// modelTarget stands in for the placeholders: absolute paths whose first
// component no layer makes.
func modelTarget(t string) string {
	t = strings.ReplaceAll(t, phDecoy, "/@s/decoy")
	return strings.ReplaceAll(t, phSandbox, "/@s")
}

// resolveDir follows rel to a directory, symlinks resolved inside the root;
// with create, missing components are made directories.
func (m *extractModel) resolveDir(rel string, create bool) (string, bool) {
	comps := tSplit(rel)
	cur, hops := "", 0
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = tParent(cur)
			continue
		}
		next := tJoin(cur, c)
		n, ok := m.nodes[next]
		switch {
		case !ok:
			if !create {
				return "", false
			}
			m.nodes[next] = mnode{kind: 'd', layer: m.layer, implicit: true}
			cur = next
		case n.kind == 'd':
			cur = next
		case n.kind == 'l':
			if hops++; hops > tMaxHops {
				return "", false
			}
			t := modelTarget(n.target)
			if strings.HasPrefix(t, "/") {
				cur = ""
			}
			comps = append(tSplit(strings.Trim(t, "/")), comps...)
		default:
			return "", false
		}
	}
	return cur, true
}

// exists tells whether rel names something, a final symlink followed.
func (m *extractModel) exists(rel string) bool {
	for hops := 0; hops <= tMaxHops; hops++ {
		d, base := path2(tClean(rel))
		pd, ok := m.resolveDir(d, false)
		if !ok {
			return false
		}
		n, ok := m.nodes[tJoin(pd, base)]
		if !ok {
			return false
		}
		if n.kind != 'l' {
			return true
		}
		t := modelTarget(n.target)
		if !strings.HasPrefix(t, "/") {
			t = tJoin(pd, t)
		}
		rel = t
	}
	return false
}

func (m *extractModel) removeUnder(rel string) {
	for k := range m.nodes {
		if tUnder(k, rel) {
			delete(m.nodes, k)
		}
	}
}

// apply applies e to the model and tells whether containerd would take it
// (the directory times its layer sets at the end included).
func (m *extractModel) apply(e ent) bool {
	rel := tClean(e.name)
	if rel == "" {
		return true
	}
	dir, base := path2(rel)
	pd, ok := m.resolveDir(dir, true)
	if !ok {
		return false
	}
	switch {
	case base == tWhOpq:
		// containerd removes what this layer did not list below the
		// directory: the parents it made itself for this layer's entries
		// too (with those entries), where the format hides lower layers only.
		for k, n := range m.nodes {
			if strictlyBelow(k, pd) && n.layer == m.layer && n.implicit {
				m.quirks = append(m.quirks, fmt.Sprintf("opaque %q removes %q, which containerd made for an entry of the same layer", e.name, k))
				break
			}
		}
		// It also removes a lower directory with what this layer wrote in it
		// (the format hides the lower content only).
	lowerDirs:
		for k, n := range m.nodes {
			if !strictlyBelow(k, pd) || n.layer >= m.layer {
				continue
			}
			for k2, n2 := range m.nodes {
				if strictlyBelow(k2, k) && n2.layer == m.layer {
					m.quirks = append(m.quirks, fmt.Sprintf("opaque %q removes lower %q with %q, which this layer wrote in it", e.name, k, k2))
					break lowerDirs
				}
			}
		}
		for k, n := range m.nodes {
			if strictlyBelow(k, pd) && n.layer < m.layer {
				delete(m.nodes, k)
			}
		}
		return m.dirTimesOK()
	case strings.HasPrefix(base, tWh):
		name := strings.TrimPrefix(base, tWh)
		if name == "" || name == "." || name == ".." {
			return false
		}
		m.removeUnder(tJoin(pd, name))
		return m.dirTimesOK()
	}
	if !devFits(e) {
		return false // ours refuses what mknod cannot store; containerd truncates it
	}
	target := tJoin(pd, base)
	if n, ok := m.nodes[target]; ok && (n.kind != 'd' || e.typ != tar.TypeDir) {
		m.removeUnder(target)
	}
	switch e.typ {
	case tar.TypeDir:
		m.nodes[target] = mnode{kind: 'd', layer: m.layer}
		m.dirEnts = append(m.dirEnts, e.name)
	case tar.TypeSymlink:
		if e.link == "" {
			return false
		}
		m.inos++
		m.meta[m.inos] = entMeta(e)
		m.nodes[target] = mnode{kind: 'l', target: e.link, layer: m.layer, ino: m.inos}
	case tar.TypeLink:
		t := tClean(modelTarget(e.link))
		td, tb := path2(t)
		tp, ok := m.resolveDir(td, false)
		if !ok || t == "" {
			return false
		}
		srcName := tJoin(tp, tb)
		src, ok := m.nodes[srcName]
		if !ok || src.kind == 'd' || srcName == target {
			return false
		}
		// The entry's metadata goes to the inode. In one directory that
		// changes every name of it; in an overlay, a lower inode is copied
		// up, and its other names in the lower layers keep theirs.
		if src.layer < m.layer && entMeta(e) != m.meta[src.ino] {
			for k, n := range m.nodes {
				if n.ino == src.ino && k != srcName && n.layer < m.layer {
					m.quirks = append(m.quirks, fmt.Sprintf("hard link %q gives its metadata to lower %q, whose inode %q shares", e.name, srcName, k))
					break
				}
			}
		}
		m.meta[src.ino] = entMeta(e)
		src.layer = m.layer
		m.nodes[target] = src
	default:
		m.inos++
		m.meta[m.inos] = entMeta(e)
		m.nodes[target] = mnode{kind: 'f', layer: m.layer, ino: m.inos}
	}
	return m.dirTimesOK()
}

// dirTimesOK: containerd sets the times of the layer's directory entries
// at its end, by name; each must still name something.
func (m *extractModel) dirTimesOK() bool {
	for _, d := range m.dirEnts {
		if !m.exists(d) {
			return false
		}
	}
	return true
}

// containerdQuirks lists where containerd's extraction of layers departs
// from the format (see extractModel.quirks).
func containerdQuirks(layers [][]ent) []string {
	m := newExtractModel()
	for li, l := range layers {
		if li > 0 {
			m.nextLayer()
		}
		for _, e := range l {
			// Asked only when containerd's extraction succeeded: an entry
			// the model would refuse (its guess at directory times) does
			// not stop it from finding the quirks of later ones.
			m.apply(e)
		}
	}
	return m.quirks
}

// strictlyBelow tells whether name k is below directory d ("" the root).
func strictlyBelow(k, d string) bool {
	return d == "" || strings.HasPrefix(k, d+"/")
}
