package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"github.com/coreos/go-systemd/v22/daemon"
	"google.golang.org/grpc"

	fuseoverlayfs "github.com/fosnap/fuseoverlayfs"
)

// serve runs the server until a stop signal: host checks, the snapshotter,
// the socket, metrics, the gRPC services, readiness, then a graceful stop.
func serve(ctx context.Context, cfg serverConfig) (err error) {
	sig := catchSignals()
	defer sig.stop()

	// The same checks, with the same messages, as the built-in plugin.
	info, err := fuseoverlayfs.Check(cfg.RootPath)
	if err != nil {
		return err
	}
	sn, err := fuseoverlayfs.NewSnapshotter(cfg.RootPath, cfg.Opts()...)
	if err != nil {
		return err
	}
	defer closeSnapshotter(sn, &err)
	l, err := listen(cfg.Socket)
	if err != nil {
		return err
	}
	stopMetrics, err := startMetrics(ctx, cfg.MetricsAddress)
	if err != nil {
		_ = l.Close()
		return err
	}
	defer stopMetrics()

	srv := newGRPCServer(sn, cfg)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	announce(ctx, cfg, log.Fields{"fuse-overlayfs": info.FuseOverlayfs, "version": info.Version, "open-files": info.OpenFiles})
	if err := waitForStop(ctx, served, sig.stops, sig.hups); err != nil {
		return fmt.Errorf("serve on %s: %w", cfg.Socket, err)
	}
	return shutdown(ctx, srv, served, cfg.Socket)
}

// signals are the channels of the signals the server acts on.
type signals struct {
	stops, hups chan os.Signal
}

// catchSignals catches SIGTERM and SIGINT from the start: a signal during
// the host check's probe mount must not kill the process before it
// unmounts; they are acted on once serving. nerdctl's unit for this server
// reloads it with SIGHUP, whose default action would end it: there is
// nothing to reload, so it is only logged.
func catchSignals() signals {
	s := signals{stops: make(chan os.Signal, 1), hups: make(chan os.Signal, 1)}
	signal.Notify(s.stops, syscall.SIGTERM, syscall.SIGINT)
	signal.Notify(s.hups, syscall.SIGHUP)
	return s
}

func (s signals) stop() {
	signal.Stop(s.stops)
	signal.Stop(s.hups)
}

// closeSnapshotter closes sn's metadata store, reporting a failure in
// *err unless it already holds one.
func closeSnapshotter(sn snapshots.Snapshotter, err *error) {
	if cerr := sn.Close(); cerr != nil && *err == nil {
		*err = fmt.Errorf("close the metadata store: %w", cerr)
	}
}

// startMetrics serves metrics on addr when one is given; the returned
// function stops them.
func startMetrics(ctx context.Context, addr string) (func(), error) {
	if addr == "" {
		return func() {}, nil
	}
	stop, err := serveMetrics(addr)
	if err != nil {
		return nil, err
	}
	log.G(ctx).WithField("address", addr).Info("serving metrics at " + metricsPath)
	return stop, nil
}

// newGRPCServer serves the snapshotter and the differ on one gRPC server:
// containerd dials each proxy plugin's address and shares one connection
// between plugins with the same address.
func newGRPCServer(sn snapshots.Snapshotter, cfg serverConfig) *grpc.Server {
	srv := grpc.NewServer(grpc.UnaryInterceptor(logDiffMetadata))
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	diffapi.RegisterDiffServer(srv, diffServer(cfg.RootPath, contentDir{cfg.ContentDir}))
	return srv
}

// announce logs what is served (with host, what the host check found),
// warns about a content directory that cannot be read yet, and tells
// systemd the service is ready.
func announce(ctx context.Context, cfg serverConfig, host log.Fields) {
	log.G(ctx).WithFields(host).WithFields(log.Fields{
		"socket": cfg.Socket, "root": cfg.RootPath, "content-dir": cfg.ContentDir,
	}).Info("serving the fuse-overlayfs snapshotter and differ")
	if _, err := os.Stat(cfg.ContentDir); err != nil {
		// Not fatal: the server may start before containerd first creates
		// it. Every Apply will name the path it looked at.
		log.G(ctx).WithError(err).Warn("containerd's content store directory cannot be read now: layers to apply are read from there")
	}
	if _, err := daemon.SdNotify(false, daemon.SdNotifyReady); err != nil {
		log.G(ctx).WithError(err).Warn("cannot tell systemd that the service is ready")
	}
}

// waitForStop returns when the server stops serving on its own (with an
// error) or a stop signal arrives (nil); SIGHUP is logged and otherwise
// ignored.
func waitForStop(ctx context.Context, served <-chan error, sigs, hups <-chan os.Signal) error {
	for {
		select {
		case err := <-served:
			if err == nil {
				err = errors.New("stopped serving")
			}
			return err
		case <-hups:
			log.G(ctx).Info("SIGHUP: nothing to reload (restart the server to change its configuration)")
		case sig := <-sigs:
			log.G(ctx).WithField("signal", sig).Info("stopping")
			return nil
		}
	}
}

// shutdown tells systemd the service is stopping and lets in-flight
// requests finish for up to shutdownGrace before closing their
// connections.
func shutdown(ctx context.Context, srv *grpc.Server, served <-chan error, socket string) error {
	_, _ = daemon.SdNotify(false, daemon.SdNotifyStopping)
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(shutdownGrace):
		log.G(ctx).Warnf("requests still running after %s: closing their connections", shutdownGrace)
		srv.Stop()
		<-stopped
	}
	// Serve returns nil after (Graceful)Stop; the listener is closed and
	// its socket file removed (dirListener.Close).
	if err := <-served; err != nil {
		return fmt.Errorf("serve on %s: %w", socket, err)
	}
	return nil
}
