//go:build tools

// Package tools pins the nerdctl command for `go build` in this module.
package tools

import _ "github.com/containerd/nerdctl/v2/cmd/nerdctl"
