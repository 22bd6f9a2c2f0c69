//! The daemon's settings, with the built-in defaults that let it run with no config file.

use std::path::PathBuf;
use std::time::Duration;

use crate::device::DeviceConfig;

/// How the daemon reads a bound client's memory (DESIGN.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessPolicy {
    /// `process_vm_readv` when the daemon may ptrace the client (it is faster), else the
    /// `/proc/self/mem` fd the client handed over.
    #[default]
    Auto,
    /// Always `process_vm_readv` (refuses clients the daemon may not ptrace).
    ProcessVm,
    /// Always the client's mem fd.
    MemFd,
}

impl AccessPolicy {
    /// Parses `auto`, `process-vm` or `mem-fd`.
    pub fn parse(s: &str) -> Option<AccessPolicy> {
        match s {
            "auto" => Some(AccessPolicy::Auto),
            "process-vm" => Some(AccessPolicy::ProcessVm),
            "mem-fd" => Some(AccessPolicy::MemFd),
            _ => None,
        }
    }
}

/// Which dirty-tracking back end to use (DESIGN.md §6); `Auto` takes the fastest one the
/// start-up probe finds working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// The fastest back end that works here.
    #[default]
    Auto,
    /// `UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN`.
    PagemapScan,
    /// `/proc/PID/clear_refs` "4" + pagemap bit 55.
    SoftDirty,
    /// Synchronous uffd write-protect faults.
    UffdWp,
    /// No dirty tracking: the shadow follows the mappings, not the contents.
    Off,
}

impl DirtyTracking {
    /// Every choice, in the order `auto` tries the back ends (after `Auto` itself).
    pub const ALL: [DirtyTracking; 5] = [
        DirtyTracking::Auto,
        DirtyTracking::PagemapScan,
        DirtyTracking::SoftDirty,
        DirtyTracking::UffdWp,
        DirtyTracking::Off,
    ];

    /// The name used by flags, the config file and `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            DirtyTracking::Auto => "auto",
            DirtyTracking::PagemapScan => "pagemap-scan",
            DirtyTracking::SoftDirty => "soft-dirty",
            DirtyTracking::UffdWp => "uffd-wp",
            DirtyTracking::Off => "off",
        }
    }

    /// Parses one of the names of [`DirtyTracking::as_str`].
    pub fn parse(s: &str) -> Option<DirtyTracking> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

/// When written pages are collected for an attach that does not choose (issue 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyPolicy {
    /// Only on an explicit `sync`.
    #[default]
    Manual,
    /// Scan a range before each device read of it.
    Strict,
    /// Scan every attached range on a timer.
    Periodic(Duration),
}

impl DirtyPolicy {
    /// Parses `manual`, `strict` or `periodic=MS` (MS ≥ 1).
    pub fn parse(s: &str) -> Option<DirtyPolicy> {
        match s {
            "manual" => Some(DirtyPolicy::Manual),
            "strict" => Some(DirtyPolicy::Strict),
            _ => {
                let ms: u64 = s.strip_prefix("periodic=")?.parse().ok()?;
                (ms > 0).then(|| DirtyPolicy::Periodic(Duration::from_millis(ms)))
            }
        }
    }
}

impl std::fmt::Display for DirtyPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirtyPolicy::Manual => f.write_str("manual"),
            DirtyPolicy::Strict => f.write_str("strict"),
            DirtyPolicy::Periodic(d) => write!(f, "periodic={}", d.as_millis()),
        }
    }
}

/// Dirty-tracking settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirtyConfig {
    /// Back end choice.
    pub tracking: DirtyTracking,
    /// Default collection policy of an attach.
    pub policy: DirtyPolicy,
}

/// Per-client quotas (G7); each refusal is a typed error to that client only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Shadow bytes one client may hold.
    pub shadow_bytes: u64,
    /// Ranges one client may have attached.
    pub mirrors: u32,
    /// Requests one client may have in flight.
    pub inflight: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            shadow_bytes: 512 << 20,
            mirrors: 256,
            inflight: 16,
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
    /// Per-client quotas.
    pub quotas: Quotas,
    /// Clients one uid may have connected at once.
    pub clients_per_uid: u32,
    /// Clients in total.
    pub max_clients: u32,
    /// Threads serving slow requests (device reads, attach, detach, release).
    pub workers: usize,
    /// How client memory is read.
    pub access: AccessPolicy,
    /// How long a reply may wait for room in a client's socket before the session is closed.
    pub send_timeout: Duration,
    /// Dirty tracking.
    pub dirty: DirtyConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: None,
            device: DeviceConfig::default(),
            quotas: Quotas::default(),
            clients_per_uid: 512,
            max_clients: 1024,
            workers: 4,
            access: AccessPolicy::Auto,
            send_timeout: Duration::from_secs(2),
            dirty: DirtyConfig::default(),
        }
    }
}

/// Errors of resolving the socket path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not root and no `XDG_RUNTIME_DIR`.
    #[error("no socket path: pass --socket, set MEMSHADOW_SOCKET, or set XDG_RUNTIME_DIR")]
    NoSocketPath,
}

/// The path rules shared with the client library: `MEMSHADOW_SOCKET` if set, else
/// `/run/memshadow/memshadowd.sock` for root, else `$XDG_RUNTIME_DIR/memshadow/memshadowd.sock`.
pub fn default_socket_path() -> Result<PathBuf, ConfigError> {
    socket_path_from(
        std::env::var_os("MEMSHADOW_SOCKET"),
        nix::unistd::geteuid().is_root(),
        std::env::var_os("XDG_RUNTIME_DIR"),
    )
}

/// [`default_socket_path`] as a pure function of its inputs.
pub fn socket_path_from(
    env: Option<std::ffi::OsString>,
    root: bool,
    xdg: Option<std::ffi::OsString>,
) -> Result<PathBuf, ConfigError> {
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        return Ok(p.into());
    }
    if root {
        return Ok("/run/memshadow/memshadowd.sock".into());
    }
    match xdg.filter(|p| !p.is_empty()) {
        Some(d) => Ok(PathBuf::from(d).join("memshadow/memshadowd.sock")),
        None => Err(ConfigError::NoSocketPath),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_names_round_trip() {
        for t in DirtyTracking::ALL {
            assert_eq!(DirtyTracking::parse(t.as_str()), Some(t));
        }
        assert_eq!(DirtyTracking::parse("softdirty"), None);
        for p in ["manual", "strict", "periodic=250"] {
            assert_eq!(
                DirtyPolicy::parse(p).map(|p| p.to_string()).as_deref(),
                Some(p)
            );
        }
        for bad in ["periodic=0", "periodic=", "periodic=x", "Strict", ""] {
            assert_eq!(DirtyPolicy::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn socket_path_rules() {
        let p = |e: Option<&str>, root, x: Option<&str>| {
            socket_path_from(e.map(Into::into), root, x.map(Into::into))
        };
        assert_eq!(p(Some("/tmp/s"), true, None).ok(), Some("/tmp/s".into()));
        assert_eq!(
            p(Some(""), true, None).ok(),
            Some("/run/memshadow/memshadowd.sock".into())
        );
        assert_eq!(
            p(None, false, Some("/run/user/1000")).ok(),
            Some("/run/user/1000/memshadow/memshadowd.sock".into())
        );
        assert!(matches!(
            p(None, false, None),
            Err(ConfigError::NoSocketPath)
        ));
    }
}
