// Builds nerdctl at a pinned version for the end-to-end tests (`make binaries`).
//
// `go install github.com/containerd/nerdctl/v2/cmd/nerdctl@v2.3.1` cannot work:
// nerdctl's go.mod replaces its test module github.com/containerd/nerdctl/mod/tigron
// with a local directory that is not part of the published module, and the
// module proxy serves no version of tigron. The nerdctl binary only needs
// tigron's interface tig.T to compile (through a test helper linked into
// it), so ./tigron provides that one interface.
module github.com/fosnap/fuseoverlayfs/tools/nerdctl

go 1.26.8

require github.com/containerd/nerdctl/v2 v2.3.1

replace github.com/containerd/nerdctl/mod/tigron => ./tigron
