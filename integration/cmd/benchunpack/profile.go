package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
)

// profileDir, when set, receives a CPU profile of containerd for each pull.
var profileDir string

// profileSeconds covers the slowest pull of the variants profiled (c is the
// slow one); time containerd spends idle after the pull adds no samples.
const profileSeconds = 20

var profileRuns = map[string]int{}

// startProfile asks containerd's debug socket for a CPU profile and returns
// a function that waits for it and writes it to profileDir. Without
// -profile, or for the proxy variant (the work is in another process), it
// does nothing.
func startProfile(socket string, v variant) func() error {
	if profileDir == "" || v.proxy {
		return func() error { return nil }
	}
	profileRuns[v.key]++
	out := filepath.Join(profileDir, fmt.Sprintf("%s-%d.pprof", v.key, profileRuns[v.key]))
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}}
	var wg sync.WaitGroup
	var err error
	wg.Add(1)
	go func() {
		defer wg.Done()
		err = fetchProfile(client, out)
	}()
	return func() error {
		wg.Wait()
		return err
	}
}

func fetchProfile(client *http.Client, out string) error {
	resp, err := client.Get(fmt.Sprintf("http://containerd/debug/pprof/profile?seconds=%d", profileSeconds))
	if err != nil {
		return fmt.Errorf("get CPU profile: %w", err)
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("get CPU profile: %s", resp.Status)
	}
	if err := os.MkdirAll(profileDir, 0o755); err != nil {
		return err
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		_ = f.Close()
		return fmt.Errorf("write CPU profile %s: %w", out, err)
	}
	return f.Close()
}
