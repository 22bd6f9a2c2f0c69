//! What `memshadow-run` tells its preload library (`libmemshadow_preload.so`): which of a
//! program's mappings to attach, and how. Each setting is one environment variable, so a
//! program may also be started with `LD_PRELOAD` and these variables set by hand; they are
//! named, written and read here only, for both sides (docs/preload.md).

use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Policy};

/// The daemon's socket (`memshadow-run --socket`), as every client reads it.
pub use memshadow_proto::path::SOCKET_ENV;

/// The smallest mapping attached, in bytes (`1M`, `256K`, `4096`).
pub const ENV_MIN_SIZE: &str = "MEMSHADOW_RUN_MIN_SIZE";
/// When written pages are collected: `lazy`, `manual`, `strict` or `periodic=MS`.
pub const ENV_DIRTY: &str = "MEMSHADOW_RUN_DIRTY";
/// The kinds of mapping attached, a comma-separated list of [`Kinds`] names.
pub const ENV_INCLUDE: &str = "MEMSHADOW_RUN_INCLUDE";
/// Kinds taken away from the included ones.
pub const ENV_EXCLUDE: &str = "MEMSHADOW_RUN_EXCLUDE";
/// `1`: the library writes nothing to the program's stderr.
pub const ENV_QUIET: &str = "MEMSHADOW_RUN_QUIET";
/// A file the library appends a grant line to for each range it attaches.
pub const ENV_GRANT_FILE: &str = "MEMSHADOW_RUN_GRANT_FILE";
/// `0`: programs the process `exec`s are not mirrored (the library leaves `LD_PRELOAD`).
pub const ENV_FOLLOW_EXEC: &str = "MEMSHADOW_RUN_FOLLOW_EXEC";
/// Where `memshadow-run` finds the preload library, before its own search.
pub const ENV_PRELOAD: &str = "MEMSHADOW_PRELOAD";
/// The file name of the preload library.
pub const PRELOAD_FILE: &str = "libmemshadow_preload.so";

/// The default smallest mapping attached: 1 MiB.
pub const DEFAULT_MIN_SIZE: usize = 1 << 20;
/// The smallest `min_size` accepted: one 4 KiB page.
pub const MIN_MIN_SIZE: usize = 4096;

/// Kinds of mapping a program makes that the preload library can attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds {
    /// `private`: `mmap(MAP_PRIVATE | MAP_ANONYMOUS)` the program calls itself.
    pub private: bool,
    /// `shared`: `mmap(MAP_SHARED | MAP_ANONYMOUS)`.
    pub shared: bool,
    /// `malloc`: blocks glibc's `malloc` family serves with a mapping of their own.
    pub malloc: bool,
    /// `heap`: the `brk` heap, as it grows.
    pub heap: bool,
}

impl Kinds {
    /// What is attached unless told otherwise: everything but the heap.
    pub const DEFAULT: Kinds = Kinds {
        private: true,
        shared: true,
        malloc: true,
        heap: false,
    };
    const NONE: Kinds = Kinds {
        private: false,
        shared: false,
        malloc: false,
        heap: false,
    };
    const NAMES: [&'static str; 4] = ["private", "shared", "malloc", "heap"];

    fn flag(&mut self, name: &str) -> Option<&mut bool> {
        match name {
            "private" => Some(&mut self.private),
            "shared" => Some(&mut self.shared),
            "malloc" => Some(&mut self.malloc),
            "heap" => Some(&mut self.heap),
            _ => None,
        }
    }

    /// Parses `a,b,c` (or `all`, or an empty list) into the kinds named.
    pub fn parse(list: &str) -> Result<Kinds, Error> {
        let mut k = Kinds::NONE;
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if name == "all" {
                k = Kinds {
                    private: true,
                    shared: true,
                    malloc: true,
                    heap: true,
                };
                continue;
            }
            match k.flag(name) {
                Some(f) => *f = true,
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown kind of mapping {name:?}; the kinds are {}",
                        Kinds::NAMES.join(", ")
                    )))
                }
            }
        }
        Ok(k)
    }

    /// These kinds without those of `other`.
    pub fn without(self, other: Kinds) -> Kinds {
        Kinds {
            private: self.private && !other.private,
            shared: self.shared && !other.shared,
            malloc: self.malloc && !other.malloc,
            heap: self.heap && !other.heap,
        }
    }

    /// The list form [`Kinds::parse`] reads.
    pub fn list(self) -> String {
        let on = [self.private, self.shared, self.malloc, self.heap];
        let names: Vec<&str> = Kinds::NAMES
            .iter()
            .zip(on)
            .filter_map(|(n, on)| on.then_some(*n))
            .collect();
        names.join(",")
    }
}

/// What to attach and how: `memshadow-run`'s options, the preload library's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPolicy {
    /// Mappings (and `malloc` blocks) smaller than this are left alone.
    pub min_size: usize,
    /// When the daemon collects the pages the program writes.
    pub dirty: Policy,
    /// What is attached.
    pub kinds: Kinds,
    /// Nothing on the program's stderr.
    pub quiet: bool,
    /// Where to append a grant line for each attached range (for external engines).
    pub grant_file: Option<PathBuf>,
    /// Programs `exec`ed are mirrored too.
    pub follow_exec: bool,
}

impl Default for RunPolicy {
    fn default() -> RunPolicy {
        RunPolicy {
            min_size: DEFAULT_MIN_SIZE,
            dirty: Policy::Lazy,
            kinds: Kinds::DEFAULT,
            quiet: false,
            grant_file: None,
            follow_exec: true,
        }
    }
}

impl RunPolicy {
    /// The policy this process's environment gives (unset variables keep the defaults).
    pub fn from_env() -> Result<RunPolicy, Error> {
        RunPolicy::from_lookup(|k| std::env::var(k).ok())
    }

    /// The policy the variables `get` returns give.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<RunPolicy, Error> {
        let mut p = RunPolicy::default();
        if let Some(v) = get(ENV_MIN_SIZE) {
            p.min_size = parse_size(&v)?;
        }
        if let Some(v) = get(ENV_DIRTY) {
            p.dirty = parse_dirty(&v)?;
        }
        if let Some(v) = get(ENV_INCLUDE) {
            p.kinds = Kinds::parse(&v)?;
        }
        if let Some(v) = get(ENV_EXCLUDE) {
            p.kinds = p.kinds.without(Kinds::parse(&v)?);
        }
        if let Some(v) = get(ENV_QUIET) {
            p.quiet = parse_switch(ENV_QUIET, &v)?;
        }
        if let Some(v) = get(ENV_FOLLOW_EXEC) {
            p.follow_exec = parse_switch(ENV_FOLLOW_EXEC, &v)?;
        }
        p.grant_file = get(ENV_GRANT_FILE)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        Ok(p)
    }

    /// The variables that give this policy, for [`RunPolicy::from_lookup`].
    pub fn to_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (ENV_MIN_SIZE, self.min_size.to_string()),
            (ENV_DIRTY, dirty_name(self.dirty)),
            (ENV_INCLUDE, self.kinds.list()),
            (ENV_QUIET, u8::from(self.quiet).to_string()),
            (ENV_FOLLOW_EXEC, u8::from(self.follow_exec).to_string()),
        ];
        if let Some(f) = &self.grant_file {
            env.push((ENV_GRANT_FILE, f.display().to_string()));
        }
        env
    }
}

/// A size in bytes, with an optional `K`, `M` or `G` (powers of 1024); at least one page.
pub fn parse_size(s: &str) -> Result<usize, Error> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let bad = || Error::InvalidArgument(format!("{s:?} is not a size (like 4096, 256K or 1M)"));
    let n: usize = digits.parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(1 << shift).ok_or_else(bad)?;
    if bytes < MIN_MIN_SIZE {
        return Err(Error::InvalidArgument(format!(
            "a minimum size below one page ({MIN_MIN_SIZE} bytes) is not accepted: {s:?}"
        )));
    }
    Ok(bytes)
}

/// `lazy`, `manual`, `strict` or `periodic=MS`.
pub fn parse_dirty(s: &str) -> Result<Policy, Error> {
    match s.trim() {
        "manual" => Ok(Policy::Manual),
        "lazy" => Ok(Policy::Lazy),
        "strict" => Ok(Policy::Strict),
        other => other
            .strip_prefix("periodic=")
            .and_then(|ms| ms.parse::<u64>().ok())
            .filter(|ms| *ms >= 10)
            .map(|ms| Policy::Periodic(Duration::from_millis(ms)))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{s:?} is not a dirty policy: lazy, manual, strict or periodic=MS (MS ≥ 10)"
                ))
            }),
    }
}

fn dirty_name(p: Policy) -> String {
    match p {
        Policy::Manual => "manual".into(),
        Policy::Lazy => "lazy".into(),
        Policy::Strict => "strict".into(),
        Policy::Periodic(d) => format!("periodic={}", d.as_millis()),
    }
}

fn parse_switch(name: &str, v: &str) -> Result<bool, Error> {
    match v.trim() {
        "1" | "yes" | "true" => Ok(true),
        "0" | "no" | "false" | "" => Ok(false),
        _ => Err(Error::InvalidArgument(format!("{name}={v:?}: say 1 or 0"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_gives_back_the_policy_it_was_made_from() {
        let p = RunPolicy {
            min_size: 256 << 10,
            dirty: Policy::Periodic(Duration::from_millis(50)),
            kinds: Kinds::parse("private,heap").expect("kinds"),
            quiet: true,
            grant_file: Some("/tmp/g".into()),
            follow_exec: false,
        };
        let env = p.to_env();
        let back =
            RunPolicy::from_lookup(|k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
                .expect("parses");
        assert_eq!(back, p);
        assert_eq!(
            RunPolicy::from_lookup(|_| None).expect("empty"),
            RunPolicy::default()
        );
    }

    #[test]
    fn sizes_kinds_and_policies_are_checked() {
        assert_eq!(parse_size("1M").expect("1M"), 1 << 20);
        assert_eq!(parse_size("256k").expect("256k"), 256 << 10);
        assert_eq!(parse_size("8192").expect("8192"), 8192);
        for bad in ["", "M", "1T", "-1", "100", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Kinds::parse("private,stack").is_err());
        assert_eq!(
            Kinds::parse("all").expect("all").list(),
            "private,shared,malloc,heap"
        );
        let k = Kinds::DEFAULT.without(Kinds::parse("malloc").expect("malloc"));
        assert_eq!(k.list(), "private,shared");
        assert_eq!(parse_dirty("strict").expect("strict"), Policy::Strict);
        assert!(parse_dirty("periodic=5").is_err());
        assert!(parse_dirty("often").is_err());
        let quiet = |v: &str| {
            RunPolicy::from_lookup(|k| (k == ENV_QUIET).then(|| v.to_owned())).map(|p| p.quiet)
        };
        assert!(quiet("1").expect("1"));
        assert!(quiet("maybe").is_err());
    }
}
