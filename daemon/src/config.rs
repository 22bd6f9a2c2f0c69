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
