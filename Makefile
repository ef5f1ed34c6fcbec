# fuse-overlayfs snapshotter for containerd.
#   make deps     install the host packages the snapshotter and its tests need
#   make test     vet, unit tests, containerd's snapshotter suite, end-to-end tests
#   make lint     golangci-lint at a pinned version
#   make demo     a private containerd runs a container on our snapshots

GO            ?= go
GOLANGCI_LINT_VERSION := v2.15.0
TOOLS         := $(CURDIR)/tools/bin
GOLANGCI_LINT := $(TOOLS)/golangci-lint-$(GOLANGCI_LINT_VERSION)

# Debian packages: command that proves it is there -> package.
APT_DEPS := fuse-overlayfs:fuse-overlayfs mount.fuse3:fuse3 runc:runc

.PHONY: all deps vet unit fuzz test lint fmt binaries integration demo FORCE

all: vet unit

deps:
	@missing=""; for pair in $(APT_DEPS); do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  if ! PATH="$$PATH:/usr/sbin:/sbin" command -v $$cmd >/dev/null 2>&1; then missing="$$missing $$pkg"; fi; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing with apt-get:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "deps: host packages present"; fi

# The packages a library user imports must also compile on other systems
# (where they return "only Linux is supported").
vet:
	$(GO) vet ./...
	GOOS=darwin $(GO) vet . ./plugin/

# Every package's tests but the end-to-end ones (integration), containerd's
# snapshotter suite included (root and FUSE needed; in CI a missing
# prerequisite fails the run). Listed by go list, so a new package is in.
UNIT_PKGS = $(shell $(GO) list ./... | grep -v '/integration$$')
unit:
	$(GO) test -count=1 $(UNIT_PKGS)

# Each fuzz target runs for a fixed number of inputs (-fuzztime Nx), sized so
# the step takes about as long on an idle machine as the old 10 s per target.
# A count, not a clock: with a wall-clock -fuzztime, Go 1.26 can fail a target
# with "context deadline exceeded" when the time ends while a worker is inside
# an input (golang/go#75804); a count has no deadline, needs no second
# toolchain, and does the same work on a loaded machine as on an idle one.
# Each run compiles the package's test binary and runs it with a fresh fuzz
# cache of its own (-test.fuzzcachedir), so it starts from the committed seeds
# and crashers (testdata/fuzz/, where a new crasher is written too) and spends
# its budget on new inputs, however often it has run before (Go's shared cache
# under GOCACHE only grows, and every run re-executes all of it first).
# Minimizing is off (FUZZ_MINIMIZE=0s): shrinking an interesting input can take
# a minute; a crasher is still saved, unminimized (FUZZ_MINIMIZE=60s shrinks).
# FUZZ_SCALE=10 for a ten times longer hunt.
FUZZ_SCALE    ?= 1
FUZZ_MINIMIZE ?= 0s
# package:target:inputs
FUZZ_TARGETS  := .:FuzzParseIDMapping:200000 .:FuzzMountOptions:200000 \
                 ./internal/layer:FuzzApplyContained:4000 ./internal/layer:FuzzContainment:300

fuzz:
	@set -e; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; rest=$${t#*:}; fn=$${rest%%:*}; n=$$(( $${rest##*:} * $(FUZZ_SCALE) )); \
	  bin="$$work/$$fn.test"; cache="$$work/$$fn.cache"; \
	  echo "fuzz: $$fn in $$pkg, $$n inputs"; \
	  $(GO) test -c -o "$$bin" $$pkg; \
	  ( cd $$pkg && "$$bin" -test.run '^$$' -test.fuzz "^$$fn\$$" -test.fuzztime "$${n}x" \
	      -test.fuzzminimizetime $(FUZZ_MINIMIZE) -test.fuzzcachedir "$$cache" -test.timeout 30m ); \
	done

test: deps vet unit fuzz integration

$(GOLANGCI_LINT):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
	mv $(TOOLS)/golangci-lint $@

lint: $(GOLANGCI_LINT)
	$(GOLANGCI_LINT) run ./...

fmt:
	gofmt -l -w $$(git ls-files '*.go')

# ---------------------------------------------------------------------------
# containerd with the plugin, pinned clients, end-to-end tests and the demo.

# The end-to-end tests and the demo also need the registry (CNCF distribution).
APT_DEPS += docker-registry:docker-registry
# The BuildKit tests' base image has the host's static busybox as /bin/sh.
APT_DEPS += busybox:busybox-static

BIN                := $(CURDIR)/bin
GO_BUILD_TAGS      := no_btrfs no_devmapper no_zfs
CONTAINERD_VERSION := v2.4.2
NERDCTL_VERSION    := v2.3.1
CRICTL_VERSION     := v1.37.0
BUILDKIT_VERSION   := v0.34.2
E2E_TIMEOUT        ?= 30m

BINARIES := $(BIN)/containerd $(BIN)/ctr $(BIN)/containerd-shim-runc-v2 \
            $(BIN)/containerd-stock $(BIN)/nerdctl $(BIN)/crictl \
            $(BIN)/containerd-fuse-overlayfs-grpc $(BIN)/buildkitd $(BIN)/buildctl

# Everything the end-to-end tests run, in bin/. Pinned tools are built once
# per version (a stamp file names it); our containerd is always handed to
# `go build`, which does nothing when no source changed.
binaries: $(BINARIES)

$(BIN)/containerd: FORCE
	@mkdir -p $(BIN)
	$(GO) build -tags "$(GO_BUILD_TAGS)" -o $@ ./cmd/containerd

# Version stamps: a new version makes the stamp newer than the binaries.
$(BIN)/.containerd-$(CONTAINERD_VERSION) $(BIN)/.nerdctl-$(NERDCTL_VERSION) $(BIN)/.crictl-$(CRICTL_VERSION) \
$(BIN)/.buildkit-$(BUILDKIT_VERSION):
	@mkdir -p $(BIN)
	@rm -f $(BIN)/$(firstword $(subst -, ,$(notdir $@)))-v*
	@touch $@

$(BIN)/ctr: $(BIN)/.containerd-$(CONTAINERD_VERSION)
	GOBIN=$(BIN) $(GO) install github.com/containerd/containerd/v2/cmd/ctr@$(CONTAINERD_VERSION)

$(BIN)/containerd-shim-runc-v2: $(BIN)/.containerd-$(CONTAINERD_VERSION)
	GOBIN=$(BIN) $(GO) install github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$(CONTAINERD_VERSION)

# containerd's own daemon, without our plugin, for comparisons.
$(BIN)/containerd-stock: $(BIN)/.containerd-$(CONTAINERD_VERSION)
	@mkdir -p $(BIN)/.stock
	GOBIN=$(BIN)/.stock $(GO) install -tags "$(GO_BUILD_TAGS)" github.com/containerd/containerd/v2/cmd/containerd@$(CONTAINERD_VERSION)
	mv $(BIN)/.stock/containerd $@

# The snapshotter and its differ served over containerd's snapshots and diff
# gRPC APIs, for a containerd without the plugin (proxy plugins; rootless
# tests, README).
$(BIN)/containerd-fuse-overlayfs-grpc: FORCE
	@mkdir -p $(BIN)
	$(GO) build -o $@ ./cmd/containerd-fuse-overlayfs-grpc

# The rootless tests run under RootlessKit (they install these themselves
# when missing; `make deps` does it up front).
APT_DEPS += rootlesskit:rootlesskit newuidmap:uidmap slirp4netns:slirp4netns

# nerdctl cannot be `go install`ed (its go.mod has a replace directive):
# tools/nerdctl pins it and explains why.
$(BIN)/nerdctl: $(BIN)/.nerdctl-$(NERDCTL_VERSION) tools/nerdctl/go.mod tools/nerdctl/go.sum
	cd tools/nerdctl && $(GO) build -o $@ github.com/containerd/nerdctl/v2/cmd/nerdctl

$(BIN)/crictl: $(BIN)/.crictl-$(CRICTL_VERSION)
	GOBIN=$(BIN) $(GO) install sigs.k8s.io/cri-tools/cmd/crictl@$(CRICTL_VERSION)

# BuildKit cannot be `go install`ed (its go.mod has exclude directives):
# tools/buildkit pins it and explains why. The BuildKit tests and
# bench-build run buildkitd with its containerd worker on our snapshotter.
BUILDKIT_LDFLAGS := -X github.com/moby/buildkit/version.Version=$(BUILDKIT_VERSION)
$(BIN)/buildkitd $(BIN)/buildctl: $(BIN)/.buildkit-$(BUILDKIT_VERSION) tools/buildkit/go.mod tools/buildkit/go.sum
	cd tools/buildkit && $(GO) build -ldflags "$(BUILDKIT_LDFLAGS)" -o $@ github.com/moby/buildkit/cmd/$(notdir $@)

# End-to-end tests: each starts its own containerd from bin/ with
# config/containerd.toml, a docker-registry on 127.0.0.1, runc and
# fuse-overlayfs. As root; with CI=true a missing prerequisite fails them.
integration: binaries
	$(GO) test -count=1 -timeout $(E2E_TIMEOUT) -v ./integration/

# The main job: one command on a fresh machine (as root).
demo: deps binaries
	$(GO) run ./integration/cmd/demo

# Unpack benchmark (issue 4): pull+unpack of a ~250 MB, 12,500-file image from
# the local registry, fast path sequential/parallel, through FUSE, overlayfs,
# native, and containerd-stock with the gRPC server's diff proxy (issue 10);
# alternating runs, medians and ratios. As root.
# The containerd roots go on tmpfs (BENCH_DIR), as for the reference figures.
BENCH_REPS ?= 5
BENCH_DIR  ?= /dev/shm
.PHONY: bench-unpack
bench-unpack: deps binaries
	$(GO) run ./integration/cmd/benchunpack -reps $(BENCH_REPS) -dir $(BENCH_DIR)

# The same on an image not made here: host trees (BENCH_TREES), a layer
# each, archived by GNU tar; written to docs/bench/unpack-trees.md.
BENCH_TREES ?= /usr/local/go,/usr/include,/usr/share/man,/usr/share/zoneinfo
.PHONY: bench-unpack-trees
bench-unpack-trees: deps binaries
	$(GO) run ./integration/cmd/benchunpack -reps $(BENCH_REPS) -dir $(BENCH_DIR) -trees $(BENCH_TREES)

# Deep paths (issue 19): 8 files at depth 100-800 over a lower as deep,
# applied by us (sequential, and detached then finished) and by containerd's
# archive.Apply; time per apply, BENCH_REPS runs of each, in BENCH_DIR (a
# disk's journal would make it a benchmark of the disk).
.PHONY: bench-deep
bench-deep:
	TMPDIR=$(BENCH_DIR) $(GO) test ./internal/layer -run '^$$' -bench BenchmarkDeepPaths -benchtime $(BENCH_REPS)x -count 1

# Commit benchmark (issue 11): `ctr snapshots diff` of a container that wrote
# 3,000 files and changed and deleted lower ones, on a 12,300-file image:
# fuse-overlayfs with our Compare, with the walking differ, and overlayfs.
.PHONY: bench-commit
bench-commit: deps binaries
	$(GO) run ./integration/cmd/benchcommit -reps $(BENCH_REPS) -dir $(BENCH_DIR)

# Build benchmark (issue 17): four BuildKit builds (RUN writing 20,000
# files, COPY of a 20,000-file context, multi-stage COPY --from, the
# deleting build) with buildkitd's containerd worker on fuse-overlayfs
# (our Compare) and on overlayfs; fresh daemons per run, alternating,
# medians of BENCH_REPS.
.PHONY: bench-build
bench-build: deps binaries
	$(GO) run ./integration/cmd/benchbuild -reps $(BENCH_REPS) -dir $(BENCH_DIR)
