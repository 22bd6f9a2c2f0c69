//! Where the log goes: the journal (structured fields) when `JOURNAL_STREAM` says stderr is
//! connected to it, else human-readable lines on stderr; and a filter that a reload changes.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// Changes the log filter at run time (a checked `log_level` value).
pub type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send>;

/// The installed logger.
pub struct Logging {
    /// Changes the filter.
    pub set_level: SetLevel,
    /// True if events go to the journal.
    pub to_journal: bool,
    /// Why the journal was wanted but could not be used (events then go to stderr).
    pub journal_error: Option<std::io::Error>,
}

impl std::fmt::Debug for Logging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logging")
            .field("to_journal", &self.to_journal)
            .field("journal_error", &self.journal_error)
            .finish()
    }
}

/// True if `JOURNAL_STREAM` (`DEVICE:INODE`) names the file stderr is (sd_journal_stream_fd,
/// systemd.exec(5)): then the service manager connected stderr to the journal.
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        Ok(st) => journal_stream_matches(&v.to_string_lossy(), st.st_dev, st.st_ino),
        Err(_) => false,
    }
}

/// True if `var` is `DEVICE:INODE` with these numbers.
pub fn journal_stream_matches(var: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = var.split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// Installs the global logger with filter `level` (a checked `log_level`; falls back to
/// `info` if it does not parse).
pub fn init(level: &str) -> Logging {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::<EnvFilter, Registry>::new(filter);
    let mut journal_error = None;
    let journal = if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(l) => Some(
                l.with_syslog_identifier("memshadowd".into())
                    .with_field_prefix(Some("MEMSHADOW".into())),
            ),
            Err(e) => {
                journal_error = Some(e);
                None
            }
        }
    } else {
        None
    };
    let to_journal = journal.is_some();
    let stderr = (!to_journal).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(stderr)
        .init();
    Logging {
        set_level: Box::new(move |s| {
            let f = EnvFilter::try_new(s).map_err(|e| e.to_string())?;
            handle.reload(f).map_err(|e| e.to_string())
        }),
        to_journal,
        journal_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(!journal_stream_matches("8:1234", 8, 1235));
        assert!(!journal_stream_matches("9:1234", 8, 1234));
        assert!(!journal_stream_matches("81234", 8, 1234));
        assert!(!journal_stream_matches("", 0, 0));
        assert!(!journal_stream_matches("a:b", 0, 0));
    }
}
