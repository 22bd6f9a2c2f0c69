//! `memshadowd`: the memshadow daemon. Runs on built-in defaults; the configuration file
//! (`/etc/memshadow/memshadowd.toml` or `--config`) and flags override them; runs as a
//! plain process or as a systemd service (socket activation, notify, watchdog, reload).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use memshadow_daemon::config::{
    default_socket_path, Config, ConfigError, DeviceLayer, DirtyLayer, Layer, QuotasLayer, Sources,
    DEFAULT_CONFIG_PATH,
};
use memshadow_daemon::server::{
    error_chain, handled_signals, ListenError, Listener, Server, ServerError,
};
use memshadow_daemon::service::activation::{inherited_listener, ActivationError};
use memshadow_daemon::service::logging::{self, Logging};
use memshadow_daemon::service::notify::{watchdog_period, Notifier};
use memshadow_daemon::service::{Reloader, Service, Stall};
use memshadow_daemon::startup::{self, PageSizeError};

/// Keeps a device-like shadow of client memory coherent through interval notifiers.
///
/// Settings come from built-in defaults, then the configuration file, then MEMSHADOW_LOG
/// (log level only), then these flags. SIGHUP reloads the file (quotas, client limits, log
/// level and flush latency change at run time; other changes are logged as not applied).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML) [default: /etc/memshadow/memshadowd.toml if it exists]
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Read no configuration file (built-in defaults and flags only).
    #[arg(long, conflicts_with = "config")]
    no_config: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Socket path, ignored under socket activation [default: $MEMSHADOW_SOCKET, else
    /// /run/memshadow/memshadowd.sock for root, else
    /// $XDG_RUNTIME_DIR/memshadow/memshadowd.sock]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Log filter: off, error, warn, info, debug, trace, or target=level,... [default: info]
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Number of engines, 1..=16 [default: 2]
    #[arg(long, value_name = "N")]
    engines: Option<u64>,
    /// Modelled TLB-flush round trip, in microseconds [default: 50]
    #[arg(long, value_name = "US")]
    flush_latency_us: Option<u64>,
    /// How long a flush waits for an external engine's acknowledgement before evicting it,
    /// in milliseconds [default: 1000]
    #[arg(long, value_name = "MS")]
    engine_ack_timeout_ms: Option<u64>,
    /// Invalidation mode: one-pass, two-pass or two-pass-batched [default: two-pass-batched]
    #[arg(long)]
    mode: Option<String>,
    /// Shadow buffer size in MiB [default: 1024]
    #[arg(long, value_name = "MIB")]
    shadow_mib: Option<u64>,
    /// Shadow MiB one client may hold [default: 256]
    #[arg(long, value_name = "MIB")]
    quota_shadow_mib: Option<u64>,
    /// Shadow MiB all clients of one user may hold together (root and the daemon's user
    /// are not counted) [default: 256]
    #[arg(long, value_name = "MIB")]
    quota_shadow_mib_per_uid: Option<u64>,
    /// Shadow MiB only root and the daemon's user may use [default: 128]
    #[arg(long, value_name = "MIB")]
    reserved_shadow_mib: Option<u64>,
    /// MiB of address space one client may attach in all [default: 4096]
    #[arg(long, value_name = "MIB")]
    quota_attached_mib: Option<u64>,
    /// Ranges one client may attach [default: 256]
    #[arg(long, value_name = "N")]
    quota_mirrors: Option<u32>,
    /// Requests one client may have in flight [default: 16]
    #[arg(long, value_name = "N")]
    quota_inflight: Option<u32>,
    /// Clients one uid may have connected [default: 64]
    #[arg(long, value_name = "N")]
    clients_per_uid: Option<u32>,
    /// Clients in total [default: 1024]
    #[arg(long, value_name = "N")]
    max_clients: Option<u32>,
    /// Of max-clients, connections only root and the daemon's user may take [default: 16]
    #[arg(long, value_name = "N")]
    reserved_clients: Option<u32>,
    /// Time a new connection has to say hello, in ms [default: 5000]
    #[arg(long, value_name = "MS")]
    handshake_timeout_ms: Option<u64>,
    /// Time a connection that mirrors nothing and streams nothing may stay silent, in s
    /// [default: 600]
    #[arg(long, value_name = "S")]
    idle_timeout_s: Option<u64>,
    /// Worker threads for slow requests [default: 4]
    #[arg(long, value_name = "N")]
    workers: Option<u64>,
    /// Dirty-tracking back end: auto, pagemap-scan, soft-dirty, uffd-wp or off [default: auto]
    #[arg(long)]
    dirty_tracking: Option<String>,
    /// When an attach collects written pages by default: manual, lazy, strict or periodic=MS
    /// [default: manual]
    #[arg(long)]
    dirty_policy: Option<String>,
}

impl Args {
    /// The flags as the top configuration layer.
    fn layer(&self) -> Layer {
        Layer {
            socket: self.socket.clone(),
            log_level: self.log_level.clone(),
            workers: self.workers,
            access: None,
            max_clients: self.max_clients,
            clients_per_uid: self.clients_per_uid,
            reserved_clients: self.reserved_clients,
            handshake_timeout_ms: self.handshake_timeout_ms,
            idle_timeout_s: self.idle_timeout_s,
            device: DeviceLayer {
                engines: self.engines,
                flush_latency_us: self.flush_latency_us,
                engine_ack_timeout_ms: self.engine_ack_timeout_ms,
                mode: self.mode.clone(),
                shadow_mib: self.shadow_mib,
            },
            quotas: QuotasLayer {
                shadow_mib: self.quota_shadow_mib,
                shadow_mib_per_uid: self.quota_shadow_mib_per_uid,
                reserved_shadow_mib: self.reserved_shadow_mib,
                attached_mib: self.quota_attached_mib,
                mirrors: self.quota_mirrors,
                inflight: self.quota_inflight,
            },
            dirty: DirtyLayer {
                tracking: self.dirty_tracking.clone(),
                policy: self.dirty_policy.clone(),
            },
        }
    }

    fn sources(&self) -> Sources {
        Sources {
            explicit: self.config.clone(),
            skip_default: self.no_config,
            flags: self.layer(),
            log_env: std::env::var("MEMSHADOW_LOG")
                .ok()
                .filter(|v| !v.is_empty()),
        }
    }
}

/// Why memshadowd stops: reported once, by [`main`], which then exits with 1.
#[derive(Debug, thiserror::Error)]
enum DaemonError {
    /// The configuration (file, environment or flags) is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The test-only stall hook is set to something unknown.
    #[error("{0}")]
    Stall(String),
    /// The kernel's pages are not the daemon's.
    #[error("cannot start")]
    PageSize(#[source] PageSizeError),
    /// The signals the session loop handles could not be blocked.
    #[error("cannot block the handled signals")]
    Signals(#[source] nix::Error),
    /// The socket passed by the service manager cannot be served.
    #[error("cannot start")]
    Activation(#[source] ActivationError),
    /// The socket could not be created.
    #[error("cannot start")]
    Listen(#[source] ListenError),
    /// The server could not start.
    #[error("cannot start")]
    Start(#[source] ServerError),
    /// The server stopped on an error.
    #[error(transparent)]
    Run(ServerError),
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The level is set from the configuration once it is read.
    let logging = logging::init("info");
    let result = if args.print_config {
        print_config(&args.sources())
    } else {
        run(&args, logging)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `--print-config`: the effective configuration on stdout.
#[allow(clippy::print_stdout)]
fn print_config(sources: &Sources) -> Result<(), DaemonError> {
    let (mut cfg, file) = sources.resolve()?;
    let mut notes = vec![format!(
        "# memshadowd effective configuration: built-in defaults < {} < MEMSHADOW_LOG < flags",
        file.map_or_else(
            || format!("no file ({DEFAULT_CONFIG_PATH} absent or --no-config)"),
            |p| p.display().to_string()
        )
    )];
    if cfg.socket.is_none() {
        match default_socket_path() {
            Ok(p) => {
                notes.push("# socket: from the path rules (not set in the file or flags)".into());
                cfg.socket = Some(p);
            }
            Err(e) => notes.push(format!("# socket: {e}")),
        }
    }
    notes.push("# a socket passed by the service manager (LISTEN_FDS) replaces `socket`".into());
    print!("{}\n{}", notes.join("\n"), cfg.to_toml());
    Ok(())
}

/// The daemon: its configuration, the checks and settings of the process, the socket, then
/// the server until it stops.
fn run(args: &Args, logging: Logging) -> Result<(), DaemonError> {
    let sources = args.sources();
    let (cfg, file) = sources.resolve()?;
    if let Err(e) = (logging.set_level)(&cfg.log_level) {
        tracing::error!(error = %e, "cannot set the log level");
    }
    if let Some(e) = &logging.journal_error {
        tracing::warn!(error = %e, "JOURNAL_STREAM names stderr but the journal socket cannot be used; logging to stderr");
    }
    let stall = prepare_process()?;
    let listener = listener(&cfg)?;
    tracing::debug!(
        file = %file.as_deref().map_or_else(|| "(none)".into(), |p| p.display().to_string()),
        journal = logging.to_journal,
        "configuration read"
    );
    let notifier = Arc::new(Notifier::from_env());
    let reloader = Reloader::new(sources, cfg.clone(), logging.set_level);
    let mut service = Service::new(Arc::clone(&notifier), watchdog_period(), stall, reloader);
    let server = Server::start(cfg, listener, service.heartbeat()).map_err(DaemonError::Start)?;
    let result = server.run_with(&mut service);
    // STOPPING=1 and the last STATUS= reach the service manager before the exit.
    notifier.flush(Duration::from_secs(1));
    result.map_err(DaemonError::Run)
}

/// What the process needs before any thread exists: pages of the size it is built for,
/// all the open files the service manager allows, the test stall hook if set, and the
/// signals the session loop handles blocked (so it gets them through its signalfd).
fn prepare_process() -> Result<Option<Stall>, DaemonError> {
    startup::check_kernel_page_size().map_err(DaemonError::PageSize)?;
    // Every client holds fds here: use all the room the service manager allows.
    match memshadow_daemon::sys::rlimit::raise_nofile() {
        Ok(l) => tracing::info!(
            soft = l.soft,
            hard = l.hard,
            "open-file limit (RLIMIT_NOFILE)"
        ),
        Err(e) => tracing::warn!("{}", error_chain(&e)),
    }
    let stall = Stall::from_env().map_err(DaemonError::Stall)?;
    if let Some(s) = stall {
        tracing::warn!(hook = ?s, "test-only stall hook enabled");
    }
    handled_signals()
        .thread_block()
        .map_err(DaemonError::Signals)?;
    Ok(stall)
}

/// The socket passed by the service manager, else one bound at the configured path (or
/// the path rules').
fn listener(cfg: &Config) -> Result<Listener, DaemonError> {
    if let Some(l) = inherited_listener().map_err(DaemonError::Activation)? {
        if let Some(p) = cfg.socket.as_deref().filter(|p| *p != l.path()) {
            tracing::warn!(
                configured = %p.display(),
                passed = %l.path().display(),
                "socket: serving on the socket passed by the service manager, not the configured path"
            );
        }
        return Ok(l);
    }
    let path = match &cfg.socket {
        Some(p) => p.clone(),
        None => default_socket_path()?,
    };
    Listener::bind(&path).map_err(DaemonError::Listen)
}
