package layer

import (
	"archive/tar"
	"testing"
)

// Grammar additions for metadata: file capabilities on files and hard
// links (containerd's lchown of a link entry drops them, TestHardLink-
// DropsCapability), device numbers of every bit width, 0 to 32 for major
// and minor (mknod stores 12 and 20 bits: the rest is refused), and hard
// links to whiteout names.

// kDevWide is a character or block device with numbers of any width.
const kDevWide = kOpaque + 1

// pCapLink is a file with a capability and hard links to it.
const pCapLink = pSwap + 1

// gCapXattrs are capability sets (with and without other xattrs) that
// entries may carry.
var gCapXattrs = []map[string]string{
	{xattrCapability: capNetBind},
	{xattrCapability: capSysTime, "user.foo": "bar"},
}

func init() {
	gKinds = append(gKinds, kDevWide, kDevWide)
	gProds = append(gProds, pCapLink)
	gXattrs = append(gXattrs, gCapXattrs...)
	// Hard links to whiteout and opaque marker names (refused, as
	// containerd's extraction, which finds no such file, refuses them).
	gLinkTargets = append(gLinkTargets, ".wh.a", "b/.wh.c", "a/.wh..wh..opq")
}

// maxUSTARDev is the largest device number a USTAR or PAX header holds;
// larger ones need the GNU format, which has no room for xattrs.
const maxUSTARDev = 1<<21 - 1

// devOfWidth is a number of exactly bits bits (0 for 0): the smallest, the
// largest or one between, as chosen.
func (g *generator) devOfWidth(bits int) int64 {
	if bits == 0 {
		return 0
	}
	lo, hi := int64(1)<<(bits-1), int64(1)<<bits-1
	switch g.pick(3) {
	case 0:
		return lo
	case 1:
		return hi
	}
	return lo + (hi-lo)/2
}

// wideDev is a device entry with a major and a minor of chosen widths;
// with xattrs coming, within what a PAX header holds.
func (g *generator) wideDev(name string, mode int64, xattrs bool) ent {
	typ := byte(tar.TypeChar)
	if g.pick(2) == 1 {
		typ = tar.TypeBlock
	}
	major, minor := g.devOfWidth(g.pick(33)), g.devOfWidth(g.pick(33))
	if xattrs {
		major, minor = min(major, maxUSTARDev), min(minor, maxUSTARDev)
	}
	return ent{name: name, typ: typ, mode: mode}.withDev(major, minor)
}

// devFits tells whether e (any entry) is no device or one whose numbers
// mknod stores (nodeOf's rule).
func devFits(e ent) bool {
	if e.typ != tar.TypeChar && e.typ != tar.TypeBlock {
		return true
	}
	return e.major >= 0 && e.major < maxDevMajor && e.minor >= 0 && e.minor < maxDevMinor
}

// capLinks is a file with a capability, then hard links to it (each with
// or without a capability of its own), some in a later entry of the same
// production through a path of its own.
func (g *generator) capLinks() []ent {
	f := g.path()
	if f == "" {
		f = "a"
	}
	owner := gOwners[g.pick(len(gOwners))]
	mode := gModes[g.pick(len(gModes))]
	out := []ent{withCap(file(f, "cap").withMode(mode).owned(owner[0], owner[1]), capNetBind)}
	g.model(out[0])
	for k := 1 + g.pick(3); k > 0; k-- {
		l := hardlink(g.path(), f).withMode(mode).owned(owner[0], owner[1])
		if tClean(l.name) == "" || tClean(l.name) == tClean(f) {
			continue
		}
		switch g.pick(4) {
		case 0:
			l = l.owned(1, 2) // another owner: the metadata changes
		case 1:
			l.xattrs = gCapXattrs[g.pick(len(gCapXattrs))]
		}
		g.model(l)
		out = append(out, l)
	}
	return out
}

// TestGrammarDevicesAndCaps: the grammar makes devices of every width on
// both sides of mknod's limits, with and without xattrs, and capability
// links; every generated layer can be written as a tar.
func TestGrammarDevicesAndCaps(t *testing.T) {
	var fits, refused, capLinks, gnu int
	for seed := range int64(3000) {
		for _, l := range genLayers(newPCGChooser(seed)) {
			if _, err := tarBytesErr(l); err != nil {
				t.Fatalf("seed %d: %v", seed, err)
			}
			hasCap := false
			for _, e := range l {
				hasCap = hasCap || e.xattrs[xattrCapability] != ""
				switch {
				case e.typ == tar.TypeLink && hasCap:
					capLinks++
				case (e.typ == tar.TypeChar || e.typ == tar.TypeBlock) && !devFits(e):
					refused++
					if e.major > maxUSTARDev || e.minor > maxUSTARDev {
						gnu++
					}
				case (e.typ == tar.TypeChar || e.typ == tar.TypeBlock) && (e.major >= 256 || e.minor >= 256):
					fits++
				}
			}
		}
	}
	t.Logf("wide devices kept: %d storable, %d refused (%d in GNU headers); %d hard links around capabilities", fits, refused, gnu, capLinks)
	if fits == 0 || refused == 0 || gnu == 0 || capLinks == 0 {
		t.Errorf("the grammar misses a case")
	}
}
