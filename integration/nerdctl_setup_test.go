package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
)

// nerdctlSetupHeading is the section of rootlessDoc with the lines to add to what
// nerdctl's setup tool prints.
const nerdctlSetupHeading = "## With nerdctl's containerd-rootless-setuptool.sh"

// readmeAdded marks, in the README's block, the lines added to nerdctl's.
const readmeAdded = "# added"

// nerdctlRootlessDir returns extras/rootless of the nerdctl module that
// tools/nerdctl pins (in the module cache once `make binaries` built it).
func nerdctlRootlessDir(t *testing.T) string {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/containerd/nerdctl/v2")
	cmd.Dir = filepath.Join(root, "tools", "nerdctl")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("find nerdctl's module (run `make binaries`): %v", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" {
		t.Fatal("nerdctl's module is not in the module cache (run `make binaries`)")
	}
	dir := filepath.Join(mod, "extras", "rootless")
	if _, err := os.Stat(filepath.Join(dir, "containerd-rootless-setuptool.sh")); err != nil {
		t.Fatal(err)
	}
	return dir
}

// setupToolOutput is what `containerd-rootless-setuptool.sh install` and
// `install-fuse-overlayfs` write (systemd units) and print (the lines for
// containerd's config.toml).
type setupToolOutput struct {
	containerd, fuseOverlayfs systemdUnit
	config                    string
}

// runSetupTool runs the tool's own install and install-fuse-overlayfs
// functions as the user, with its own init and unit installer; only
// systemctl, which this host lacks, is a stub that succeeds, and the check
// subcommand (a RootlessKit trial run that install starts with) is left out.
// The test then plays systemd's part with the units written.
func runSetupTool(t *testing.T, r *rootlessRun, env []string, tool string) setupToolOutput {
	t.Helper()
	data, err := os.ReadFile(tool)
	if err != nil {
		t.Fatal(err)
	}
	functions, _, ok := strings.Cut(string(data), "\n# parse CLI args\n")
	if !ok {
		t.Fatalf("%s changed: no \"# parse CLI args\" line", tool)
	}
	script := functions + `
systemctl() { return 0; }
cmd_entrypoint_check() { INFO "check: skipped by the test"; }
cmd_entrypoint_install
cmd_entrypoint_install_fuse_overlayfs
`
	// $0 is the tool itself, as when it runs: its REALPATH0 goes into the
	// fuse-overlayfs unit's ExecStart.
	cmd := r.user.Shell(context.Background(), append(env, "FOSNAP_SETUPTOOL="+script), `exec sh -c "$FOSNAP_SETUPTOOL" "`+tool+`"`)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("the setup tool's install functions: %v\n%s\n%s", err, &stdout, &stderr)
	}
	t.Logf("the setup tool printed:\n%s\n%s", indent(stdout.String()), indent(stderr.String()))
	_, block, ok := strings.Cut(stdout.String(), "### BEGIN ###\n")
	if ok {
		block, _, ok = strings.Cut(block, "###  END  ###")
	}
	if !ok {
		t.Fatalf("the setup tool printed no config block:\n%s", &stdout)
	}
	unitDir := filepath.Join(envValue(env, "HOME"), ".config", "systemd", "user")
	read := func(name string) systemdUnit {
		data, err := os.ReadFile(filepath.Join(unitDir, name))
		if err != nil {
			t.Fatal(err)
		}
		return parseUnit(t, string(data))
	}
	return setupToolOutput{containerd: read("containerd.service"), fuseOverlayfs: read("containerd-fuse-overlayfs.service"), config: block}
}

func envValue(env []string, name string) string {
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, name+"="); ok {
			return v
		}
	}
	return ""
}

// TestNerdctlSetupTool sets up rootless containerd the way nerdctl v2.3.1's
// containerd-rootless-setuptool.sh does, as the unprivileged user: the
// tool's own install and install-fuse-overlayfs write containerd.service
// (ExecStart containerd-rootless.sh, which runs containerd under
// RootlessKit) and containerd-fuse-overlayfs.service (ExecStart: the tool's
// nsenter running containerd-fuse-overlayfs-grpc <socket> <root>,
// KillMode=mixed) and print the lines for containerd's config.toml; the
// test runs the units as systemd would, with containerd-stock as
// containerd, and nerdctl (CONTAINERD_SNAPSHOTTER=fuse-overlayfs, as the
// tool says) loads an image and runs a container on fuse-overlayfs.
//
// as-written: the printed lines alone work with our server, layers going
// through containerd's walking differ (the server applies none). SIGHUP
// (the unit's ExecReload) does not stop the server; SIGTERM to the main
// process, which is the server, ends the unit with status 0 and nothing
// left for KillMode=mixed to kill.
//
// fast-path: the same lines plus the README's additions: the server applies
// the layers itself, reading them from containerd's content store at its
// default place for nerdctl's layout.
func TestNerdctlSetupTool(t *testing.T) {
	r := newRootlessRun(t, []string{"containerd-stock", "containerd-fuse-overlayfs-grpc"}, true)
	extras := nerdctlRootlessDir(t)
	home := filepath.Join(r.stage, "home")
	runtimeDir := filepath.Join(r.stage, "run")
	// BIN, where the tool expects containerd-rootless.sh, and containerd:
	// the unit's PATH starts there, so `containerd` is the stock one.
	binDir := filepath.Join(r.stage, "nerdctl-bin")
	if err := os.Mkdir(binDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"containerd-rootless.sh", "containerd-rootless-setuptool.sh"} {
		data, err := os.ReadFile(filepath.Join(extras, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(binDir, f), data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(filepath.Join(r.repo, "bin", "containerd-stock"), filepath.Join(binDir, "containerd")); err != nil {
		t.Fatal(err)
	}
	if err := chownTree(binDir, r.user.UID, r.user.GID); err != nil {
		t.Fatal(err)
	}
	// containerd-rootless.sh's RootlessKit uses slirp4netns, which creates
	// a tap device.
	if err := os.Chmod("/dev/net/tun", 0o666); err != nil {
		t.Fatal(err)
	}
	// The user's session: what systemd's user manager and a login shell
	// have.
	env := append([]string{"HOME=" + home, "XDG_RUNTIME_DIR=" + runtimeDir, "PATH=" + binDir + ":" + envValue(r.env, "PATH")},
		harness.EnvWithout(r.env, "HOME", "XDG_RUNTIME_DIR", "PATH", innerEnv)...)

	tool := runSetupTool(t, r, env, filepath.Join(binDir, "containerd-rootless-setuptool.sh"))
	fo := tool.fuseOverlayfs
	for key, want := range map[string]string{"KillMode": "mixed", "Type": "simple", "ExecReload": `/bin/kill -s HUP $MAINPID`} {
		if got := fo.values[key]; got != want {
			t.Errorf("containerd-fuse-overlayfs.service: %s=%q, want %q:\n%s", key, got, want, fo.text)
		}
	}
	socket := filepath.Join(runtimeDir, "containerd-fuse-overlayfs.sock")
	serverRoot := filepath.Join(home, ".local", "share", "containerd-fuse-overlayfs")
	wantExec := fmt.Sprintf(`"%s" nsenter containerd-fuse-overlayfs-grpc "%s" "%s"`, filepath.Join(binDir, "containerd-rootless-setuptool.sh"), socket, serverRoot)
	if fo.execStart != wantExec {
		t.Fatalf("containerd-fuse-overlayfs.service: ExecStart=%s, want %s", fo.execStart, wantExec)
	}

	// The README's lines for the fast path: nerdctl's, as printed for a
	// user with uid 1000 and home /home/user, with lines marked as added.
	readme := readmeText(t)
	fast := readmeBlock(t, readme, nerdctlSetupHeading, "toml", 0)
	fast = strings.NewReplacer("/run/user/1000", runtimeDir, "/home/user/.local/share", filepath.Join(home, ".local", "share")).Replace(fast)
	var kept []string
	for _, line := range strings.SplitAfter(fast, "\n") {
		if !strings.HasSuffix(strings.TrimRight(line, "\n"), readmeAdded) {
			kept = append(kept, line)
		}
	}
	if strings.Join(kept, "") != tool.config {
		t.Fatalf("README.md's block under %q, without the lines marked %q, is not what nerdctl's tool prints:\n--- README\n%s--- tool\n%s", nerdctlSetupHeading, readmeAdded, strings.Join(kept, ""), tool.config)
	}

	archive := filepath.Join(r.stage, "features.tar")
	const ref = "example.test/nerdctl-setup/features:1"
	features := getFixture(t).features
	if err := images.WriteOCIArchive(archive, ref, features); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(archive, 0o644); err != nil {
		t.Fatal(err)
	}
	client := "export CONTAINERD_SNAPSHOTTER=fuse-overlayfs\n" +
		"nerdctl load -i " + archive + "\n" +
		"nerdctl run --rm --net none " + ref + " " + images.ProbePath + " echo hi\n" +
		"nerdctl rmi " + ref + "\n"

	for _, tc := range []struct {
		name, config string
		fast         bool
	}{{"as-written", tool.config, false}, {"fast-path", fast, true}} {
		t.Run(tc.name, func(t *testing.T) {
			// Fresh containerd and server roots (files of subordinate IDs:
			// removed as root).
			for _, d := range []string{filepath.Join(home, ".local", "share", "containerd"), serverRoot} {
				if err := os.RemoveAll(d); err != nil {
					t.Fatal(err)
				}
			}
			cfgPath := filepath.Join(home, ".config", "containerd", "config.toml")
			if err := os.MkdirAll(filepath.Dir(cfgPath), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(cfgPath, []byte(tc.config), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := chownTree(filepath.Join(home, ".config"), r.user.UID, r.user.GID); err != nil {
				t.Fatal(err)
			}

			d := startReadmeContainerd(t, r, append(env, tool.containerd.environment...), tool.containerd.execStart)
			server := startUnit(t, r, append(env, fo.environment...), fo.execStart)
			server.waitSocket(t, socket)
			server.assertMainIs(t, "containerd-fuse-overlayfs-grpc")
			// systemctl reload: the unit's ExecReload, as written.
			reload := strings.ReplaceAll(fo.values["ExecReload"], "$MAINPID", fmt.Sprint(server.proc.PID()))
			if out, err := r.user.Shell(context.Background(), env, reload).CombinedOutput(); err != nil {
				t.Fatalf("%s: %v\n%s", reload, err, out)
			}
			if err := harness.Poll(10*time.Second, 50*time.Millisecond, func() error {
				if !strings.Contains(server.out.String(), "SIGHUP") {
					return fmt.Errorf("no SIGHUP line in the server's log")
				}
				return nil
			}); err != nil {
				t.Fatalf("%v:\n%s", err, server.out)
			}

			out := d.user(t, client)
			if !strings.Contains(out, "\nhi\n") && !strings.HasPrefix(out, "hi\n") {
				t.Fatalf("nerdctl run did not print hi:\n%s", out)
			}
			direct := strings.Count(server.out.String(), `level=info msg="layer applied directly"`)
			if tc.fast && direct < len(features.Layers)/2 {
				t.Errorf("the server applied %d layers directly, want most of the image's %d:\n%s", direct, len(features.Layers), server.out)
			}
			if !tc.fast && direct != 0 {
				t.Errorf("with nerdctl's lines alone the server applied %d layers (no diff proxy is configured)", direct)
			}

			// systemctl stop: the server first (PartOf=containerd.service
			// stops it with containerd), then containerd.
			server.stopMixed(t)
			if _, err := os.Lstat(socket); err == nil {
				t.Errorf("socket %s left after the server stopped", socket)
			}
			if !d.proc.Running() {
				t.Fatalf("containerd's RootlessKit is gone before its stop: %v", d.proc.Err())
			}
			d.stop(t)
		})
	}
}

// readmeText returns rootlessDoc, where the nerdctl block is.
func readmeText(t *testing.T) string {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(root, rootlessDoc))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}
