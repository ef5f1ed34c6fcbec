// Command demo is `make demo`: it starts a private containerd (root, state
// and socket in a temporary directory) with the fuse-overlayfs plugin,
// builds a three-layer image without the internet, serves it from a local
// docker-registry, pulls it into the fuse-overlayfs snapshotter, runs a
// container that prints a line from each layer, shows the snapshot chain
// and the FUSE mount while the container runs, then stops everything and
// checks that nothing is left behind. Run it as root, from the repository,
// after `make deps binaries` (make demo does both).
package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/fosnap/fuseoverlayfs/integration/internal/harness"
	"github.com/fosnap/fuseoverlayfs/integration/internal/images"
	"github.com/fosnap/fuseoverlayfs/internal/testutil"
)

const sn = harness.SnapshotterID

func main() {
	d := &demo{ctx: context.Background()}
	// ^C or SIGTERM: clean up as on an error, then exit.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "\ndemo: %v received, cleaning up\n", s)
		if err := d.cleanup(); err != nil {
			fmt.Fprintln(os.Stderr, "demo:", err)
		}
		os.Exit(130)
	}()
	err := d.run()
	cleanErr := d.cleanup()
	if err == nil {
		err = cleanErr
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo FAILED:", err)
		os.Exit(1)
	}
	fmt.Println("\ndemo: done, nothing left behind.")
}

type demo struct {
	ctx      context.Context
	dir      string
	registry *harness.Registry
	c        *harness.Containerd
	ctrRun   *testutil.Process // `ctr run --rm` of the container
	runErr   bytes.Buffer
	cleaned  bool
}

func step(format string, args ...any) {
	fmt.Printf("\n==> "+format+"\n", args...)
}

func show(out string) {
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		fmt.Println("    " + l)
	}
}

// run goes through the demo's steps in order; cleanup undoes what they
// started, whether they got through or not.
func (d *demo) run() error {
	if err := checkHost(); err != nil {
		return err
	}
	var err error
	if d.dir, err = os.MkdirTemp("", "fo-demo-"); err != nil {
		return err
	}
	ref, err := d.publishImage()
	if err != nil {
		return err
	}
	if err := d.startContainerd(); err != nil {
		return err
	}
	if err := d.pullAndRun(ref); err != nil {
		return err
	}
	if err := d.showSnapshots(); err != nil {
		return err
	}
	step("the FUSE mount while the container runs (/proc/self/mountinfo) and the process serving it")
	if err := d.showFuse(); err != nil {
		return err
	}
	return d.stopAndRemove(ref)
}

// checkHost says what the demo needs and whether this host has it.
func checkHost() error {
	step("checking this host")
	if missing := harness.Missing(); len(missing) > 0 {
		return fmt.Errorf("missing prerequisites (make deps binaries):\n  %s", strings.Join(missing, "\n  "))
	}
	fmt.Println("    root, /dev/fuse, bin/ (containerd with the plugin, ctr, shim), runc, fuse-overlayfs, mount.fuse3, docker-registry: all there")
	return nil
}

// publishImage builds the demo image, starts the local registry and
// pushes the image there; it returns the image's reference.
func (d *demo) publishImage() (string, error) {
	step("building the demo image (3 layers, a static Go program and a text file per layer)")
	probe, err := harness.BuildProbe(d.dir)
	if err != nil {
		return "", err
	}
	spec := images.Demo(probe)
	for i, l := range spec.Layers {
		var names []string
		for _, e := range l {
			names = append(names, "/"+e.Path)
		}
		fmt.Printf("    layer %d: %s\n", i+1, strings.Join(names, " "))
	}

	step("starting a local registry (docker-registry) on 127.0.0.1 and pushing the image")
	if d.registry, err = harness.StartRegistry(filepath.Join(d.dir, "registry")); err != nil {
		return "", err
	}
	ref, err := images.Push(d.registry.Addr, spec)
	if err != nil {
		return "", err
	}
	fmt.Printf("    registry pid %d, image %s\n", d.registry.PID(), ref)
	return ref, nil
}

// startContainerd starts the private containerd and checks that it loaded
// the snapshotter.
func (d *demo) startContainerd() error {
	step("starting a private containerd with config/containerd.toml")
	var err error
	d.c, err = harness.StartContainerd(d.ctx, harness.Options{Dir: filepath.Join(d.dir, "containerd"), Registry: d.registry.Addr})
	if err != nil {
		return err
	}
	fmt.Printf("    pid %d, root %s, socket %s\n", d.c.PID(), d.c.Root, d.c.Address)
	out, err := d.c.Ctr(d.ctx, "plugins", "ls", "type==io.containerd.snapshotter.v1")
	if err != nil {
		return err
	}
	show(out)
	if !pluginOK(out) {
		return errors.New("the fuse-overlayfs snapshotter did not load; see `ctr plugins ls -d`")
	}
	return nil
}

// pullAndRun pulls ref into the snapshotter and starts the container,
// returning once it has printed its lines.
func (d *demo) pullAndRun(ref string) error {
	step("ctr images pull --snapshotter %s %s", sn, ref)
	if _, err := d.c.Ctr(d.ctx, "images", "pull", "--plain-http", "--snapshotter", sn, ref); err != nil {
		return err
	}
	fmt.Println("    pulled and unpacked")

	step("ctr run --snapshotter %s %s demo (the container prints a line from each layer)", sn, ref)
	ready, err := d.startContainer(ref)
	if err != nil {
		return err
	}
	select {
	case <-ready:
		return nil
	case <-time.After(60 * time.Second):
		return errors.New("the container did not print its lines within 60s")
	}
}

// showSnapshots prints the snapshot chain and the running container's
// mounts as the snapshotter hands them out.
func (d *demo) showSnapshots() error {
	step("the snapshot chain (ctr snapshots --snapshotter %s tree)", sn)
	for _, args := range [][]string{{"tree"}, {"ls"}} {
		out, err := d.c.Ctr(d.ctx, append([]string{"snapshots", "--snapshotter", sn}, args...)...)
		if err != nil {
			return err
		}
		show(out)
	}

	step("the container's mount, as the snapshotter hands it out (ctr snapshots mounts)")
	out, err := d.c.Ctr(d.ctx, "snapshots", "--snapshotter", sn, "mounts", "/rootfs", "demo")
	if err != nil {
		return err
	}
	show(strings.ReplaceAll(out, ",", ",\n      "))
	return nil
}

// stopAndRemove kills the container (ctr run --rm then removes it) and
// removes the image.
func (d *demo) stopAndRemove(ref string) error {
	step("stopping the container (ctr tasks kill demo; ctr run --rm removes it)")
	if _, err := d.c.Ctr(d.ctx, "tasks", "kill", "demo"); err != nil {
		return err
	}
	if err := d.waitContainer(); err != nil {
		return err
	}
	fmt.Println("    container exited and was removed")
	if _, err := d.c.Ctr(d.ctx, "images", "rm", "--sync", ref); err != nil {
		return err
	}
	fmt.Println("    image removed")
	return nil
}

func pluginOK(list string) bool {
	for _, l := range strings.Split(list, "\n") {
		f := strings.Fields(l)
		if len(f) >= 3 && f[1] == sn && f[len(f)-1] == "ok" {
			return true
		}
	}
	return false
}

// startContainer runs `ctr run --rm` in the background, echoes the
// container's output and closes the returned channel once the container
// says it is ready.
func (d *demo) startContainer(ref string) (<-chan struct{}, error) {
	cmd := exec.Command(filepath.Join(d.c.Bin, "ctr"), "--address", d.c.Address,
		"run", "--rm", "--snapshotter", sn, ref, "demo")
	pr, pw := io.Pipe()
	cmd.Stdout = pw
	// ctr's own warnings (cgroup v1 deprecation) only matter on failure.
	cmd.Stderr = &d.runErr
	p, err := testutil.StartProcess("ctr run", cmd)
	if err != nil {
		return nil, err
	}
	d.ctrRun = p
	go func() {
		<-p.Done()
		_ = pw.Close()
	}()
	ready := make(chan struct{})
	go echoContainer(pr, ready)
	return ready, nil
}

// echoContainer prints the container's output and closes ready when it
// says "ready".
func echoContainer(r io.Reader, ready chan<- struct{}) {
	sc := bufio.NewScanner(r)
	closed := false
	for sc.Scan() {
		fmt.Println("    container | " + sc.Text())
		if sc.Text() == "ready" && !closed {
			close(ready)
			closed = true
		}
	}
}

func (d *demo) waitContainer() error {
	if !d.ctrRun.Exited(30 * time.Second) {
		return errors.New("ctr run did not end within 30s of the stop signal")
	}
	if err := d.ctrRun.Err(); err != nil {
		return fmt.Errorf("ctr run: %w\n%s", err, d.runErr.String())
	}
	return nil
}

func (d *demo) showFuse() error {
	mounts, err := harness.Mounts()
	if err != nil {
		return err
	}
	found := false
	for _, m := range mounts {
		if strings.HasPrefix(m.Point, d.dir+"/") && strings.HasPrefix(m.FSType, "fuse") {
			fmt.Printf("    %s type %s source %s\n", m.Point, m.FSType, m.Source)
			found = true
		}
	}
	if !found {
		return errors.New("no FUSE mount found for the running container")
	}
	left, err := harness.FindLeftovers(d.dir)
	if err != nil {
		return err
	}
	for _, p := range left.Procs {
		if filepath.Base(strings.Fields(p.Cmdline)[0]) == "fuse-overlayfs" {
			cmdline := p.Cmdline
			if len(cmdline) > 300 {
				cmdline = cmdline[:300] + "..."
			}
			fmt.Printf("    pid %d: %s\n", p.PID, cmdline)
		}
	}
	return nil
}

// cleanup stops the container, containerd and the registry by PID, and
// checks that no mount or process of the demo's directory is left.
func (d *demo) cleanup() error {
	if d.cleaned {
		return nil
	}
	d.cleaned = true
	step("stopping containerd and the registry, checking that nothing is left")
	var errs []error
	if d.c != nil && d.c.Running() {
		if removed, err := d.c.Sweep(d.ctx); err != nil {
			errs = append(errs, err)
		} else if len(removed) > 0 {
			fmt.Printf("    removed leftover %v\n", removed)
		}
		if err := d.c.Stop(); err != nil {
			errs = append(errs, err)
		}
		fmt.Println("    containerd stopped")
	}
	if d.ctrRun != nil {
		d.ctrRun.Kill()
	}
	if d.registry != nil {
		if err := d.registry.Stop(); err != nil {
			errs = append(errs, err)
		}
		fmt.Println("    registry stopped")
	}
	if d.dir != "" {
		left, err := harness.WaitNoLeftovers(d.dir, 15*time.Second)
		if err != nil {
			errs = append(errs, err)
		}
		if !left.Empty() {
			errs = append(errs, fmt.Errorf("left behind (now cleaned up):\n%s", left))
			_ = harness.CleanLeftovers(left)
		} else {
			fmt.Println("    no FUSE mount and no process of the demo left (checked /proc/self/mountinfo and /proc/*/cmdline)")
		}
		if err := os.RemoveAll(d.dir); err != nil {
			errs = append(errs, err)
		}
		fmt.Printf("    removed %s\n", d.dir)
	}
	return errors.Join(errs...)
}
