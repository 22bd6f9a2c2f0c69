//! The daemon's settings: built-in defaults that let it run with no config file, the TOML
//! configuration file (`/etc/memshadow/memshadowd.toml` or `--config`), command-line flags
//! over it, and which settings a reload (`SIGHUP`) may change at run time (docs/design.md §1).
//!
//! Precedence, lowest first: built-in defaults, the file, `MEMSHADOW_LOG` (log level only),
//! command-line flags. Every layer is a [`Layer`]; [`Config::from_layers`] checks and applies
//! them, and every error names the key and where it came from.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::device::{DeviceConfig, InvalidationMode, MAX_CAPACITY, MAX_ENGINES};
use crate::dirty::{DirtyPolicy, DirtyTracking};

/// Dirty-tracking settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirtyConfig {
    /// Back end choice.
    pub tracking: DirtyTracking,
    /// Default collection policy of an attach.
    pub policy: DirtyPolicy,
}

/// Quotas (G7); each refusal is a typed error to that client only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Shadow bytes one client may hold.
    pub shadow_bytes: u64,
    /// Shadow bytes all clients of one unprivileged uid may hold together (root and the
    /// daemon's own user are not counted against it).
    pub shadow_bytes_per_uid: u64,
    /// Shadow bytes only root and the daemon's own user may take: other users get
    /// "shadow full" once just this much is free.
    pub reserved_shadow_bytes: u64,
    /// Bytes of address space one client may have attached (sum of its mirrors' lengths):
    /// attaching arms write protection over the whole range, which costs the kernel page
    /// tables whether or not anything is ever mirrored.
    pub attached_bytes: u64,
    /// Ranges one client may have attached.
    pub mirrors: u32,
    /// Requests one client may have in flight.
    pub inflight: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            shadow_bytes: 256 << 20,
            shadow_bytes_per_uid: 256 << 20,
            reserved_shadow_bytes: 128 << 20,
            attached_bytes: 4 << 30,
            mirrors: 256,
            inflight: 16,
        }
    }
}

/// Who may connect and hold how much: the settings a reload (`SIGHUP`) changes at run
/// time, read by the server per use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Quotas.
    pub quotas: Quotas,
    /// Clients one uid may have connected at once.
    pub clients_per_uid: u32,
    /// Clients in total.
    pub max_clients: u32,
    /// Of `max_clients`, connections only root and the daemon's own user may take.
    pub reserved_clients: u32,
    /// How long a new connection may take to say `Hello`.
    pub handshake_timeout: Duration,
    /// How long a connection that mirrors nothing and streams nothing may stay silent.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            quotas: Quotas::default(),
            clients_per_uid: 64,
            max_clients: 1024,
            reserved_clients: 16,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Everything `memshadowd` can be told.
#[derive(Debug, Clone)]
pub struct Config {
    /// Socket path; `None` applies the path rules ([`default_socket_path`]).
    pub socket: Option<PathBuf>,
    /// The device model.
    pub device: DeviceConfig,
    /// Quotas and client limits (reloadable).
    pub limits: Limits,
    /// Threads serving slow requests (device reads, attach, detach, release).
    pub workers: usize,
    /// Dirty tracking.
    pub dirty: DirtyConfig,
    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`, `off`) or
    /// comma-separated `target=level` directives.
    pub log_level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: None,
            device: DeviceConfig::default(),
            limits: Limits::default(),
            workers: 4,
            dirty: DirtyConfig::default(),
            log_level: "info".into(),
        }
    }
}

/// Errors of the configuration: every one names the file (or flag) and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not root and no `XDG_RUNTIME_DIR`.
    #[error("no socket path: pass --socket, set MEMSHADOW_SOCKET, or set XDG_RUNTIME_DIR")]
    NoSocketPath,
    /// The configuration file could not be read.
    #[error("cannot read the configuration file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not valid TOML.
    #[error("{at}: {msg}")]
    Syntax {
        /// File and line.
        at: String,
        /// What is wrong.
        msg: String,
    },
    /// A key the daemon does not know.
    #[error("{at}: unknown key `{key}`{hint}")]
    UnknownKey {
        /// File and line.
        at: String,
        /// The dotted key.
        key: String,
        /// The keys allowed there.
        hint: String,
    },
    /// A value of the wrong type or out of range.
    #[error("{at}: bad value for {key}: {why}")]
    BadValue {
        /// File (and line when known), or "command line".
        at: String,
        /// The dotted key (in backquotes) or the flag.
        key: String,
        /// What is wrong.
        why: ValueError,
    },
}

/// What is wrong with one value (where it came from and its key are in
/// [`ConfigError::BadValue`]).
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// Not of the type the key takes (the TOML reader's words).
    #[error("{0}")]
    Type(String),
    /// A number outside the range the key allows.
    #[error("{value} is outside {lo}..={hi}")]
    OutOfRange {
        /// The value.
        value: u64,
        /// The lowest allowed.
        lo: u64,
        /// The highest allowed.
        hi: u64,
    },
    /// A name that is not one of the key's choices.
    #[error("{value:?} is not one of {choices}")]
    NotOneOf {
        /// The value.
        value: String,
        /// The choices, as the error names them.
        choices: &'static str,
    },
    /// An empty socket path.
    #[error("empty path")]
    EmptyPath,
    /// A socket path longer than `sun_path` holds.
    #[error("{0} bytes is too long for a Unix socket path (at most {MAX_SOCKET_PATH})")]
    PathTooLong(usize),
    /// An empty log filter.
    #[error("empty (use a level: off, error, warn, info, debug, trace)")]
    EmptyLogLevel,
    /// A directive of a log filter whose level is not a level.
    #[error("{0:?} is not a level (off, error, warn, info, debug, trace) or target=level")]
    NotALevel(String),
    /// A log filter the logger refuses.
    #[error("{0}")]
    LogFilter(#[from] tracing_subscriber::filter::ParseError),
    /// The retired `access = "process-vm"`.
    #[error(
        "process-vm was removed: a pid may name another program after the client execs (a \
         setuid one, say), so memshadowd reads a client's memory only through the \
         /proc/self/mem the client handed over; drop the setting"
    )]
    ProcessVmRemoved,
    /// Any other `access` value.
    #[error("{0:?} is not mem-fd (the only access path; the setting can be dropped)")]
    NotMemFd(String),
    /// `quotas.reserved_shadow_mib` takes the whole shadow.
    #[error(
        "{reserved_mib} MiB leaves nothing of the {shadow_mib} MiB shadow (device.shadow_mib) \
         to other users; lower it with the shadow"
    )]
    ReservesAllShadow {
        /// The reserve.
        reserved_mib: u64,
        /// The shadow.
        shadow_mib: u64,
    },
    /// `reserved_clients` takes every connection.
    #[error("{reserved} leaves none of the {max} connections (max_clients) to other users")]
    ReservesAllClients {
        /// The reserve.
        reserved: u32,
        /// `max_clients`.
        max: u32,
    },
}

/// The longest socket path (`sun_path` less its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The configuration file used when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/memshadow/memshadowd.toml";

/// Where a [`Layer`] came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A configuration file.
    File(PathBuf),
    /// Command-line flags.
    Flags,
    /// The `MEMSHADOW_LOG` environment variable.
    LogEnv,
}

impl Source {
    fn at(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Flags => "command line".into(),
            Source::LogEnv => "environment".into(),
        }
    }

    fn key_name(&self, key: &'static str) -> String {
        match self {
            Source::File(_) => format!("`{key}`"),
            Source::Flags => key_info(key).map_or(key, |k| k.flag).to_owned(),
            Source::LogEnv => "MEMSHADOW_LOG".into(),
        }
    }
}

/// A setting the configuration file knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// Dotted name in the file (`quotas.mirrors`).
    pub name: &'static str,
    /// The command-line flag that overrides it.
    pub flag: &'static str,
    /// True if `SIGHUP` applies a change at run time; else a change needs a restart.
    pub reloadable: bool,
}

const fn key(name: &'static str, flag: &'static str, reloadable: bool) -> Key {
    Key {
        name,
        flag,
        reloadable,
    }
}

/// Every key of the configuration file, in the order `--print-config` shows them.
pub const KEYS: &[Key] = &[
    key("socket", "--socket", false),
    key("log_level", "--log-level", true),
    key("workers", "--workers", false),
    key("max_clients", "--max-clients", true),
    key("clients_per_uid", "--clients-per-uid", true),
    key("reserved_clients", "--reserved-clients", true),
    key("handshake_timeout_ms", "--handshake-timeout-ms", true),
    key("idle_timeout_s", "--idle-timeout-s", true),
    key("device.engines", "--engines", false),
    key("device.flush_latency_us", "--flush-latency-us", true),
    key(
        "device.engine_ack_timeout_ms",
        "--engine-ack-timeout-ms",
        true,
    ),
    key("device.mode", "--mode", false),
    key("device.shadow_mib", "--shadow-mib", false),
    key("quotas.shadow_mib", "--quota-shadow-mib", true),
    key(
        "quotas.shadow_mib_per_uid",
        "--quota-shadow-mib-per-uid",
        true,
    ),
    key("quotas.reserved_shadow_mib", "--reserved-shadow-mib", true),
    key("quotas.attached_mib", "--quota-attached-mib", true),
    key("quotas.mirrors", "--quota-mirrors", true),
    key("quotas.inflight", "--quota-inflight", true),
    key("dirty.tracking", "--dirty-tracking", false),
    key("dirty.policy", "--dirty-policy", false),
];

/// The entry of [`KEYS`] named `name`.
pub fn key_info(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// One layer of settings (the file, or the flags): `None` leaves the layer below in force.
/// Values stay raw here; [`Config::from_layers`] checks them and names the key when one is
/// bad.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// Socket path (ignored when the service manager passes the socket).
    pub socket: Option<PathBuf>,
    /// Log filter.
    pub log_level: Option<String>,
    /// Worker threads.
    pub workers: Option<u64>,
    /// Kept so that 0.1 configuration files still load: `mem-fd` (or `auto`, which now means
    /// the same) is accepted and changes nothing; `process-vm` is refused. memshadowd reads a
    /// client's memory only through the `/proc/self/mem` fd the client handed over
    /// (docs/threat-model.md).
    pub access: Option<String>,
    /// Clients in total.
    pub max_clients: Option<u32>,
    /// Clients one uid may have connected.
    pub clients_per_uid: Option<u32>,
    /// Connections kept for root and the daemon's user.
    pub reserved_clients: Option<u32>,
    /// Time a new connection has to say `Hello`, ms.
    pub handshake_timeout_ms: Option<u64>,
    /// Time an idle connection that mirrors and streams nothing is kept, s.
    pub idle_timeout_s: Option<u64>,
    /// `[device]`.
    #[serde(default)]
    pub device: DeviceLayer,
    /// `[quotas]`.
    #[serde(default)]
    pub quotas: QuotasLayer,
    /// `[dirty]`.
    #[serde(default)]
    pub dirty: DirtyLayer,
}

/// The `[device]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceLayer {
    /// Engines (1..=16).
    pub engines: Option<u64>,
    /// Modelled TLB-flush round trip in µs.
    pub flush_latency_us: Option<u64>,
    /// How long a flush waits for an external engine before evicting it, ms.
    pub engine_ack_timeout_ms: Option<u64>,
    /// Invalidation mode.
    pub mode: Option<String>,
    /// Shadow buffer size in MiB.
    pub shadow_mib: Option<u64>,
}

/// The `[quotas]` table (per client).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotasLayer {
    /// Shadow MiB one client may hold.
    pub shadow_mib: Option<u64>,
    /// Shadow MiB one unprivileged uid may hold.
    pub shadow_mib_per_uid: Option<u64>,
    /// Shadow MiB kept for root and the daemon's user.
    pub reserved_shadow_mib: Option<u64>,
    /// MiB of address space one client may attach.
    pub attached_mib: Option<u64>,
    /// Ranges one client may attach.
    pub mirrors: Option<u32>,
    /// Requests one client may have in flight.
    pub inflight: Option<u32>,
}

/// The `[dirty]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirtyLayer {
    /// Back end choice.
    pub tracking: Option<String>,
    /// Default collection policy.
    pub policy: Option<String>,
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> Option<usize> {
    let start = span?.start.min(text.len());
    Some(
        text.as_bytes()[..start]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1,
    )
}

fn at_line(path: &Path, line: Option<usize>) -> String {
    match line {
        Some(l) => format!("{} line {l}", path.display()),
        None => path.display().to_string(),
    }
}

impl Layer {
    /// Parses the text of configuration file `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Layer, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            at: at_line(path, line_of(text, e.span())),
            msg: e.message().to_owned(),
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.inner();
            let at = at_line(path, line_of(text, inner.span()));
            let msg = inner.message();
            match msg.strip_prefix("unknown field ") {
                Some(rest) => ConfigError::UnknownKey {
                    at,
                    key,
                    hint: rest
                        .split_once(", ")
                        .map(|(_, h)| format!(" ({h})"))
                        .unwrap_or_default(),
                },
                None => ConfigError::BadValue {
                    at,
                    key: format!("`{key}`"),
                    why: ValueError::Type(msg.to_owned()),
                },
            }
        })
    }

    /// Reads and parses configuration file `path`.
    pub fn load(path: &Path) -> Result<Layer, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        Layer::parse(&text, path)
    }
}

/// The configuration file to read: `explicit` (which must exist), else
/// [`DEFAULT_CONFIG_PATH`] if it exists, else none (`skip_default` also skips it).
pub fn config_file(explicit: Option<&Path>, skip_default: bool) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_owned()),
        None if skip_default => None,
        None => {
            let p = Path::new(DEFAULT_CONFIG_PATH);
            // A file that exists but cannot be read is an error when it is loaded.
            std::fs::symlink_metadata(p).is_ok().then(|| p.to_owned())
        }
    }
}

/// Where the configuration comes from; read again, the same way, on every reload.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config PATH` (must exist).
    pub explicit: Option<PathBuf>,
    /// `--no-config`: do not read [`DEFAULT_CONFIG_PATH`].
    pub skip_default: bool,
    /// The command-line flags.
    pub flags: Layer,
    /// `MEMSHADOW_LOG`, over the file's `log_level` and under `--log-level`.
    pub log_env: Option<String>,
}

impl Sources {
    /// The file to read now (see [`config_file`]).
    pub fn file(&self) -> Option<PathBuf> {
        config_file(self.explicit.as_deref(), self.skip_default)
    }

    /// Defaults, then the file, then `MEMSHADOW_LOG`, then the flags; and the file read.
    pub fn resolve(&self) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let path = self.file();
        let file = path.as_deref().map(Layer::load).transpose()?;
        let file_src = Source::File(path.clone().unwrap_or_default());
        let env = self.log_env.as_ref().map(|v| Layer {
            log_level: Some(v.clone()),
            ..Layer::default()
        });
        let mut layers: Vec<(&Layer, &Source)> = Vec::with_capacity(3);
        if let Some(f) = &file {
            layers.push((f, &file_src));
        }
        if let Some(e) = &env {
            layers.push((e, &Source::LogEnv));
        }
        layers.push((&self.flags, &Source::Flags));
        Ok((Config::from_layers(&layers)?, path))
    }
}

/// Checks a log filter: comma-separated levels or `target=level` directives (a bare word
/// that is not a level would silently select a target and hide everything else).
pub fn check_log_level(s: &str) -> Result<(), ValueError> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if s.trim().is_empty() {
        return Err(ValueError::EmptyLogLevel);
    }
    for d in s.split(',') {
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l).trim();
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(ValueError::NotALevel(d.to_owned()));
        }
    }
    tracing_subscriber::EnvFilter::try_new(s).map(drop)?;
    Ok(())
}

/// The retired `access` setting: only the value that is now the one way is accepted.
fn check_access(v: &str) -> Result<(), ValueError> {
    match v {
        "mem-fd" | "auto" => Ok(()),
        "process-vm" => Err(ValueError::ProcessVmRemoved),
        _ => Err(ValueError::NotMemFd(v.to_owned())),
    }
}

/// A socket path a Unix socket can take.
fn check_socket_path(p: &Path) -> Result<(), ValueError> {
    match p.as_os_str().len() {
        0 => Err(ValueError::EmptyPath),
        n if n > MAX_SOCKET_PATH => Err(ValueError::PathTooLong(n)),
        _ => Ok(()),
    }
}

/// `v` if it is within `lo..=hi`.
fn in_range<T: PartialOrd + Into<u64> + Copy>(v: T, lo: T, hi: T) -> Result<T, ValueError> {
    if v < lo || v > hi {
        Err(ValueError::OutOfRange {
            value: v.into(),
            lo: lo.into(),
            hi: hi.into(),
        })
    } else {
        Ok(v)
    }
}

/// `Some(v)` as a value of `choices`, named in the error if it is none of them.
fn one_of<T>(v: &str, parsed: Option<T>, choices: &'static str) -> Result<T, ValueError> {
    parsed.ok_or_else(|| ValueError::NotOneOf {
        value: v.to_owned(),
        choices,
    })
}

fn parse_mode(s: &str) -> Result<InvalidationMode, ValueError> {
    let mode = [
        InvalidationMode::OnePass,
        InvalidationMode::TwoPass,
        InvalidationMode::TwoPassBatched,
    ]
    .into_iter()
    .find(|m| m.as_str() == s);
    one_of(s, mode, "one-pass, two-pass, two-pass-batched")
}

fn parse_tracking(s: &str) -> Result<DirtyTracking, ValueError> {
    one_of(
        s,
        DirtyTracking::parse(s),
        "auto, pagemap-scan, soft-dirty, uffd-wp, off",
    )
}

fn parse_policy(s: &str) -> Result<DirtyPolicy, ValueError> {
    one_of(
        s,
        DirtyPolicy::parse(s),
        "manual, lazy, strict, periodic=MS (MS >= 1)",
    )
}

const MIB: u64 = 1 << 20;

/// Names the key and the layer in an error about one of its values.
struct Checker<'a> {
    src: &'a Source,
}

impl Checker<'_> {
    /// `r`'s value, or the error naming `key` and where it came from.
    fn check<T>(&self, key: &'static str, r: Result<T, ValueError>) -> Result<T, ConfigError> {
        r.map_err(|why| ConfigError::BadValue {
            at: self.src.at(),
            key: self.src.key_name(key),
            why,
        })
    }

    /// `v` MiB in bytes, if `v` is within `lo..=hi`.
    fn mib(&self, key: &'static str, v: u64, lo: u64, hi: u64) -> Result<u64, ConfigError> {
        Ok(self.check(key, in_range(v, lo, hi))? * MIB)
    }
}

impl Config {
    /// Built-in defaults with `layers` applied in order (later layers win).
    pub fn from_layers(layers: &[(&Layer, &Source)]) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        for (layer, src) in layers {
            c.apply(layer, src)?;
        }
        c.check_together(layers.last().map_or(&Source::Flags, |(_, s)| *s))?;
        Ok(c)
    }

    /// Checks the settings that bound each other; `src` is named in the error (the top
    /// layer, where such a mistake is usually fixed).
    fn check_together(&self, src: &Source) -> Result<(), ConfigError> {
        let c = Checker { src };
        let (lim, q) = (&self.limits, &self.limits.quotas);
        if q.reserved_shadow_bytes >= self.device.shadow_capacity {
            let why = ValueError::ReservesAllShadow {
                reserved_mib: q.reserved_shadow_bytes >> 20,
                shadow_mib: self.device.shadow_capacity >> 20,
            };
            return c.check("quotas.reserved_shadow_mib", Err(why));
        }
        if lim.reserved_clients >= lim.max_clients {
            let why = ValueError::ReservesAllClients {
                reserved: lim.reserved_clients,
                max: lim.max_clients,
            };
            return c.check("reserved_clients", Err(why));
        }
        Ok(())
    }

    /// Applies layer `l`, which came from `src`, key by key: the top-level keys, then the
    /// `[device]`, `[quotas]` and `[dirty]` tables.
    fn apply(&mut self, l: &Layer, src: &Source) -> Result<(), ConfigError> {
        let c = Checker { src };
        self.apply_top(l, &c)?;
        self.apply_clients(l, &c)?;
        self.apply_device(&l.device, &c)?;
        self.apply_quotas(&l.quotas, &c)?;
        self.apply_dirty(&l.dirty, &c)
    }

    fn apply_top(&mut self, l: &Layer, c: &Checker<'_>) -> Result<(), ConfigError> {
        if let Some(p) = &l.socket {
            c.check("socket", check_socket_path(p))?;
            self.socket = Some(p.clone());
        }
        if let Some(v) = &l.log_level {
            c.check("log_level", check_log_level(v))?;
            self.log_level = v.clone();
        }
        if let Some(v) = l.workers {
            self.workers = c.check("workers", in_range(v, 1, 256))? as usize;
        }
        if let Some(v) = &l.access {
            c.check("access", check_access(v))?;
        }
        Ok(())
    }

    /// Who may connect, and for how long without saying anything.
    fn apply_clients(&mut self, l: &Layer, c: &Checker<'_>) -> Result<(), ConfigError> {
        let lim = &mut self.limits;
        if let Some(v) = l.max_clients {
            lim.max_clients = c.check("max_clients", in_range(v, 1, 1 << 20))?;
        }
        if let Some(v) = l.clients_per_uid {
            lim.clients_per_uid = c.check("clients_per_uid", in_range(v, 1, 1 << 20))?;
        }
        if let Some(v) = l.reserved_clients {
            lim.reserved_clients = c.check("reserved_clients", in_range(v, 0, 1 << 20))?;
        }
        if let Some(v) = l.handshake_timeout_ms {
            let ms = c.check("handshake_timeout_ms", in_range(v, 10, 3_600_000))?;
            lim.handshake_timeout = Duration::from_millis(ms);
        }
        if let Some(v) = l.idle_timeout_s {
            let s = c.check("idle_timeout_s", in_range(v, 1, 30 * 86_400))?;
            lim.idle_timeout = Duration::from_secs(s);
        }
        Ok(())
    }

    fn apply_device(&mut self, d: &DeviceLayer, c: &Checker<'_>) -> Result<(), ConfigError> {
        if let Some(v) = d.engines {
            let n = c.check("device.engines", in_range(v, 1, MAX_ENGINES as u64))?;
            self.device.engines = n as usize;
        }
        if let Some(v) = d.flush_latency_us {
            let us = c.check("device.flush_latency_us", in_range(v, 0, 10_000_000))?;
            self.device.flush_latency = Duration::from_micros(us);
        }
        if let Some(v) = d.engine_ack_timeout_ms {
            let ms = c.check("device.engine_ack_timeout_ms", in_range(v, 1, 60_000))?;
            self.device.engine_ack_timeout = Duration::from_millis(ms);
        }
        if let Some(v) = &d.mode {
            self.device.mode = c.check("device.mode", parse_mode(v))?;
        }
        if let Some(v) = d.shadow_mib {
            self.device.shadow_capacity = c.mib("device.shadow_mib", v, 1, MAX_CAPACITY / MIB)?;
        }
        Ok(())
    }

    fn apply_quotas(&mut self, q: &QuotasLayer, c: &Checker<'_>) -> Result<(), ConfigError> {
        let lq = &mut self.limits.quotas;
        let max_mib = MAX_CAPACITY / MIB;
        if let Some(v) = q.shadow_mib {
            lq.shadow_bytes = c.mib("quotas.shadow_mib", v, 1, max_mib)?;
        }
        if let Some(v) = q.shadow_mib_per_uid {
            lq.shadow_bytes_per_uid = c.mib("quotas.shadow_mib_per_uid", v, 0, max_mib)?;
        }
        if let Some(v) = q.reserved_shadow_mib {
            lq.reserved_shadow_bytes = c.mib("quotas.reserved_shadow_mib", v, 0, max_mib)?;
        }
        if let Some(v) = q.attached_mib {
            lq.attached_bytes = c.mib("quotas.attached_mib", v, 1, 1 << 27)?;
        }
        if let Some(v) = q.mirrors {
            lq.mirrors = c.check("quotas.mirrors", in_range(v, 1, 1 << 20))?;
        }
        if let Some(v) = q.inflight {
            lq.inflight = c.check("quotas.inflight", in_range(v, 1, 4096))?;
        }
        Ok(())
    }

    fn apply_dirty(&mut self, d: &DirtyLayer, c: &Checker<'_>) -> Result<(), ConfigError> {
        if let Some(v) = &d.tracking {
            self.dirty.tracking = c.check("dirty.tracking", parse_tracking(v))?;
        }
        if let Some(v) = &d.policy {
            self.dirty.policy = c.check("dirty.policy", parse_policy(v))?;
        }
        Ok(())
    }

    /// The settings the server reads per use (reloadable).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Every key with its value as a TOML literal, in [`KEYS`] order (`socket` only if set).
    pub fn values(&self) -> Vec<(&'static str, String)> {
        let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
        let (lim, q) = (&self.limits, &self.limits.quotas);
        let mut v = Vec::with_capacity(KEYS.len());
        if let Some(p) = &self.socket {
            v.push(("socket", s(&p.to_string_lossy())));
        }
        v.extend([
            ("log_level", s(&self.log_level)),
            ("workers", self.workers.to_string()),
            ("max_clients", lim.max_clients.to_string()),
            ("clients_per_uid", lim.clients_per_uid.to_string()),
            ("reserved_clients", lim.reserved_clients.to_string()),
            (
                "handshake_timeout_ms",
                lim.handshake_timeout.as_millis().to_string(),
            ),
            ("idle_timeout_s", lim.idle_timeout.as_secs().to_string()),
            ("device.engines", self.device.engines.to_string()),
            (
                "device.flush_latency_us",
                self.device.flush_latency.as_micros().to_string(),
            ),
            (
                "device.engine_ack_timeout_ms",
                self.device.engine_ack_timeout.as_millis().to_string(),
            ),
            ("device.mode", s(self.device.mode.as_str())),
            (
                "device.shadow_mib",
                (self.device.shadow_capacity >> 20).to_string(),
            ),
            ("quotas.shadow_mib", (q.shadow_bytes >> 20).to_string()),
            (
                "quotas.shadow_mib_per_uid",
                (q.shadow_bytes_per_uid >> 20).to_string(),
            ),
            (
                "quotas.reserved_shadow_mib",
                (q.reserved_shadow_bytes >> 20).to_string(),
            ),
            ("quotas.attached_mib", (q.attached_bytes >> 20).to_string()),
            ("quotas.mirrors", q.mirrors.to_string()),
            ("quotas.inflight", q.inflight.to_string()),
            ("dirty.tracking", s(self.dirty.tracking.as_str())),
            ("dirty.policy", s(&self.dirty.policy.to_string())),
        ]);
        v
    }

    /// The configuration as a TOML file that [`Layer::parse`] reads back to the same values.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let mut section = "";
        for (key, val) in self.values() {
            let (sec, name) = key.split_once('.').unwrap_or(("", key));
            if sec != section {
                let _ = write!(out, "\n[{sec}]\n");
                section = sec;
            }
            let _ = writeln!(out, "{name} = {val}");
        }
        out
    }

    /// Keys whose value differs between `self` and `other`.
    pub fn changed_keys(&self, other: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.socket != other.socket {
            changed.push("socket");
        }
        let (a, b) = (self.values(), other.values());
        let skip = |v: &[(&'static str, String)]| {
            usize::from(v.first().is_some_and(|(k, _)| *k == "socket"))
        };
        let (a, b) = (&a[skip(&a)..], &b[skip(&b)..]);
        for ((k, x), (_, y)) in a.iter().zip(b) {
            if x != y {
                changed.push(*k);
            }
        }
        changed
    }

    /// `self` with the run-time reloadable settings of `new` (the rest stays as running).
    pub fn with_reloadable(&self, new: &Config) -> Config {
        let mut c = self.clone();
        c.log_level = new.log_level.clone();
        c.limits = new.limits;
        c.device.flush_latency = new.device.flush_latency;
        c.device.engine_ack_timeout = new.device.engine_ack_timeout;
        c
    }
}

/// The socket path by the rules shared with the client library
/// ([`memshadow_proto::path::socket_path`]).
pub fn default_socket_path() -> Result<PathBuf, ConfigError> {
    memshadow_proto::socket_path().ok_or(ConfigError::NoSocketPath)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dirty_names_round_trip() {
        for t in DirtyTracking::ALL {
            assert_eq!(DirtyTracking::parse(t.as_str()), Some(t));
        }
        assert_eq!(DirtyTracking::parse("softdirty"), None);
        for p in ["manual", "lazy", "strict", "periodic=250"] {
            assert_eq!(
                DirtyPolicy::parse(p).map(|p| p.to_string()).as_deref(),
                Some(p)
            );
        }
        for bad in ["periodic=0", "periodic=", "periodic=x", "Strict", ""] {
            assert_eq!(DirtyPolicy::parse(bad), None, "{bad}");
        }
    }

    fn file(text: &str) -> Result<Layer, ConfigError> {
        Layer::parse(text, Path::new("/etc/m.toml"))
    }

    fn cfg(layers: &[(&Layer, &Source)]) -> Config {
        Config::from_layers(layers).expect("valid layers")
    }

    #[test]
    fn unknown_keys_name_the_key_the_file_and_the_line() {
        let e = file("workers = 2\n\n[quotas]\nmirorrs = 3\n").unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with("/etc/m.toml line 4: unknown key `quotas.mirorrs` (expected one of"),
            "{m}"
        );
        assert!(m.contains("`mirrors`"), "{m}");
        let m = file("bogus = 1").unwrap_err().to_string();
        assert!(
            m.starts_with("/etc/m.toml line 1: unknown key `bogus`"),
            "{m}"
        );
        let m = file("[nope]\nx = 1").unwrap_err().to_string();
        assert!(m.contains("unknown key `nope`"), "{m}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_file() {
        let m = file("[device]\nengines = \"two\"").unwrap_err().to_string();
        assert!(
            m.starts_with("/etc/m.toml line 2: bad value for `device.engines`: invalid type"),
            "{m}"
        );
        let m = file("[quotas]\nmirrors = -1").unwrap_err().to_string();
        assert!(m.contains("`quotas.mirrors`"), "{m}");
        let m = file("workers = [").unwrap_err().to_string();
        assert!(m.starts_with("/etc/m.toml line 1: "), "{m}");
        // Range and enum checks happen when the layer is applied.
        let src = Source::File("/etc/m.toml".into());
        for (text, key) in [
            ("[device]\nengines = 17", "`device.engines`"),
            ("[device]\nmode = \"three-pass\"", "`device.mode`"),
            ("[dirty]\npolicy = \"periodic=0\"", "`dirty.policy`"),
            ("[dirty]\ntracking = \"magic\"", "`dirty.tracking`"),
            ("access = \"ptrace\"", "`access`"),
            ("log_level = \"verbose\"", "`log_level`"),
            ("workers = 0", "`workers`"),
            ("[quotas]\ninflight = 0", "`quotas.inflight`"),
        ] {
            let l = file(text).expect(text);
            let m = Config::from_layers(&[(&l, &src)]).unwrap_err().to_string();
            assert!(
                m.starts_with(&format!("/etc/m.toml: bad value for {key}: ")),
                "{text}: {m}"
            );
        }
        // A flag's error names the flag.
        let flags = Layer {
            device: DeviceLayer {
                engines: Some(0),
                ..DeviceLayer::default()
            },
            ..Layer::default()
        };
        let m = Config::from_layers(&[(&flags, &Source::Flags)])
            .unwrap_err()
            .to_string();
        assert_eq!(
            m,
            "command line: bad value for --engines: 0 is outside 1..=16"
        );
    }

    /// Each check says what is wrong with a typed error, which `BadValue` names the key and
    /// the layer of.
    #[test]
    fn value_errors_are_typed() {
        let why = |l: Layer| match Config::from_layers(&[(&l, &Source::Flags)]) {
            Err(ConfigError::BadValue { why, .. }) => why,
            r => panic!("{r:?}"),
        };
        let top = |f: fn(&mut Layer)| {
            let mut l = Layer::default();
            f(&mut l);
            why(l)
        };
        assert!(matches!(
            top(|l| l.workers = Some(0)),
            ValueError::OutOfRange {
                value: 0,
                lo: 1,
                hi: 256
            }
        ));
        assert!(matches!(
            top(|l| l.socket = Some(PathBuf::new())),
            ValueError::EmptyPath
        ));
        assert_eq!(
            top(|l| l.socket = Some("s".repeat(108).into())).to_string(),
            "108 bytes is too long for a Unix socket path (at most 107)"
        );
        assert!(matches!(
            top(|l| l.access = Some("process-vm".into())),
            ValueError::ProcessVmRemoved
        ));
        assert!(matches!(
            top(|l| l.log_level = Some(" ".into())),
            ValueError::EmptyLogLevel
        ));
        assert!(matches!(
            top(|l| l.log_level = Some("info,loud".into())),
            ValueError::NotALevel(d) if d == "loud"
        ));
        assert!(matches!(
            top(|l| l.dirty.policy = Some("periodic=0".into())),
            ValueError::NotOneOf { value, .. } if value == "periodic=0"
        ));
        assert!(matches!(
            top(|l| {
                l.max_clients = Some(4);
                l.reserved_clients = Some(4);
            }),
            ValueError::ReservesAllClients {
                reserved: 4,
                max: 4
            }
        ));
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let f = file("workers = 3\n[quotas]\nmirrors = 7\ninflight = 5\n").expect("parse");
        let flags = Layer {
            quotas: QuotasLayer {
                mirrors: Some(9),
                ..QuotasLayer::default()
            },
            ..Layer::default()
        };
        let c = cfg(&[(&f, &Source::File("/f".into())), (&flags, &Source::Flags)]);
        assert_eq!(c.workers, 3, "from the file");
        assert_eq!(c.limits.quotas.mirrors, 9, "the flag wins");
        assert_eq!(c.limits.quotas.inflight, 5, "from the file");
        assert_eq!(
            c.device.engines,
            Config::default().device.engines,
            "default"
        );
    }

    #[test]
    fn to_toml_reads_back_to_the_same_configuration() {
        let f = file(
            "socket = \"/tmp/x.sock\"\nlog_level = \"info,memshadow_daemon=debug\"\n\
             [device]\nengines = 3\nflush_latency_us = 7\nmode = \"one-pass\"\n\
             [dirty]\npolicy = \"periodic=250\"\ntracking = \"off\"\n",
        )
        .expect("parse");
        let src = Source::File("/f".into());
        let c = cfg(&[(&f, &src)]);
        let again = cfg(&[(&file(&c.to_toml()).expect("reparse"), &src)]);
        assert_eq!(c.to_toml(), again.to_toml());
        assert!(c.changed_keys(&again).is_empty());
        let d = Config::default();
        assert_eq!(
            cfg(&[(&file(&d.to_toml()).expect("reparse"), &src)]).to_toml(),
            d.to_toml()
        );
        assert_eq!(
            c.changed_keys(&d),
            [
                "socket",
                "log_level",
                "device.engines",
                "device.flush_latency_us",
                "device.mode",
                "dirty.tracking",
                "dirty.policy"
            ]
        );
    }

    /// `with_reloadable` takes exactly the keys marked reloadable in `KEYS`.
    #[test]
    fn reloadable_keys_match_the_table() {
        let d = Config::default();
        let changed_one = |key: &str| -> Config {
            let text = match key {
                "socket" => "socket = \"/tmp/other.sock\"".to_owned(),
                "log_level" => "log_level = \"debug\"".to_owned(),
                "handshake_timeout_ms" => "handshake_timeout_ms = 30".to_owned(),
                "max_clients" => "max_clients = 30".to_owned(),
                "device.shadow_mib" => "[device]\nshadow_mib = 300".to_owned(),
                "device.mode" => "[device]\nmode = \"one-pass\"".to_owned(),
                "dirty.tracking" => "[dirty]\ntracking = \"off\"".to_owned(),
                "dirty.policy" => "[dirty]\npolicy = \"strict\"".to_owned(),
                k => match k.split_once('.') {
                    Some((t, n)) => format!("[{t}]\n{n} = 3"),
                    None => format!("{k} = 3"),
                },
            };
            cfg(&[(&file(&text).expect(&text), &Source::Flags)])
        };
        for k in KEYS {
            let new = changed_one(k.name);
            assert_eq!(d.changed_keys(&new), [k.name], "{}", k.name);
            let applied = d.with_reloadable(&new);
            let left = applied.changed_keys(&new);
            if k.reloadable {
                assert!(left.is_empty(), "{} should reload", k.name);
            } else {
                assert_eq!(left, [k.name], "{} should need a restart", k.name);
            }
        }
    }

    #[test]
    fn log_levels() {
        for ok in [
            "info",
            "debug",
            "WARN",
            "off",
            "info,memshadow_daemon::server=trace",
        ] {
            assert!(check_log_level(ok).is_ok(), "{ok}");
        }
        for bad in ["", "verbose", "inof", "memshadow_daemon=loud"] {
            assert!(check_log_level(bad).is_err(), "{bad}");
        }
    }
}
