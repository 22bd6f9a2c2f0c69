//! `memshadowd`: the memshadow daemon. Runs on built-in defaults; every setting has a flag.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use memshadow_daemon::config::{
    default_socket_path, AccessPolicy, Config, DirtyConfig, DirtyPolicy, DirtyTracking,
};
use memshadow_daemon::device::InvalidationMode;
use memshadow_daemon::server::{error_chain, shutdown_signals, Server};

/// Keeps a device-like shadow of client memory coherent through interval notifiers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Socket path [default: $MEMSHADOW_SOCKET, else /run/memshadow/memshadowd.sock for
    /// root, else $XDG_RUNTIME_DIR/memshadow/memshadowd.sock]
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Number of engines (1..=16).
    #[arg(long, default_value_t = 2)]
    engines: usize,
    /// Modelled TLB-flush round trip, in microseconds.
    #[arg(long, default_value_t = 50)]
    flush_latency_us: u64,
    /// Invalidation mode: one-pass, two-pass or two-pass-batched.
    #[arg(long, default_value = "two-pass-batched", value_parser = parse_mode)]
    mode: InvalidationMode,
    /// Shadow buffer size in MiB.
    #[arg(long, default_value_t = 1024)]
    shadow_mib: u64,
    /// Shadow bytes one client may hold, in MiB.
    #[arg(long, default_value_t = 512)]
    quota_shadow_mib: u64,
    /// Ranges one client may attach.
    #[arg(long, default_value_t = 256)]
    quota_mirrors: u32,
    /// Requests one client may have in flight.
    #[arg(long, default_value_t = 16)]
    quota_inflight: u32,
    /// Clients one uid may have connected.
    #[arg(long, default_value_t = 512)]
    clients_per_uid: u32,
    /// Clients in total.
    #[arg(long, default_value_t = 1024)]
    max_clients: u32,
    /// Worker threads for slow requests.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// How client memory is read: auto, process-vm or mem-fd.
    #[arg(long, default_value = "auto", value_parser = parse_access)]
    access: AccessPolicy,
    /// Dirty-tracking back end: auto, pagemap-scan, soft-dirty, uffd-wp or off.
    #[arg(long, default_value = "auto", value_parser = parse_tracking)]
    dirty_tracking: DirtyTracking,
    /// When an attach collects written pages by default: manual, strict or periodic=MS.
    #[arg(long, default_value = "manual", value_parser = parse_policy)]
    dirty_policy: DirtyPolicy,
}

fn parse_mode(s: &str) -> Result<InvalidationMode, String> {
    [
        InvalidationMode::OnePass,
        InvalidationMode::TwoPass,
        InvalidationMode::TwoPassBatched,
    ]
    .into_iter()
    .find(|m| m.as_str() == s)
    .ok_or_else(|| format!("unknown mode {s:?} (one-pass, two-pass, two-pass-batched)"))
}

fn parse_access(s: &str) -> Result<AccessPolicy, String> {
    AccessPolicy::parse(s)
        .ok_or_else(|| format!("unknown access policy {s:?} (auto, process-vm, mem-fd)"))
}

fn parse_tracking(s: &str) -> Result<DirtyTracking, String> {
    DirtyTracking::parse(s).ok_or_else(|| {
        format!("unknown dirty tracking {s:?} (auto, pagemap-scan, soft-dirty, uffd-wp, off)")
    })
}

fn parse_policy(s: &str) -> Result<DirtyPolicy, String> {
    DirtyPolicy::parse(s)
        .ok_or_else(|| format!("unknown dirty policy {s:?} (manual, strict, periodic=MS)"))
}

fn config(a: &Args) -> Config {
    let mut c = Config {
        socket: a.socket.clone(),
        clients_per_uid: a.clients_per_uid,
        max_clients: a.max_clients,
        workers: a.workers,
        access: a.access,
        dirty: DirtyConfig {
            tracking: a.dirty_tracking,
            policy: a.dirty_policy,
        },
        ..Config::default()
    };
    c.device.engines = a.engines;
    c.device.flush_latency = Duration::from_micros(a.flush_latency_us);
    c.device.mode = a.mode;
    c.device.shadow_capacity = a.shadow_mib << 20;
    c.quotas.shadow_bytes = a.quota_shadow_mib << 20;
    c.quotas.mirrors = a.quota_mirrors;
    c.quotas.inflight = a.quota_inflight;
    c
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MEMSHADOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Before any thread exists, so the session loop gets these through its signalfd.
    if let Err(e) = shutdown_signals().thread_block() {
        tracing::error!(error = %e, "cannot block the shutdown signals");
        return ExitCode::FAILURE;
    }
    let cfg = config(&args);
    let path = match cfg
        .socket
        .clone()
        .map(Ok)
        .unwrap_or_else(default_socket_path)
    {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::new(cfg, &path) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot start: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
