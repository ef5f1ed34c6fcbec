//go:build tools

// Package tools pins the buildkitd and buildctl commands for `go build` in
// this module.
package tools

import (
	_ "github.com/moby/buildkit/cmd/buildctl"
	_ "github.com/moby/buildkit/cmd/buildkitd"
)
