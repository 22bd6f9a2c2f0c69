//! `memshadow-run [OPTIONS] -- PROGRAM ARGS…`: runs PROGRAM with the preload library, which
//! attaches the anonymous mappings it makes to memshadowd (docs/preload.md). It `exec`s the
//! program, so the program keeps this process's pid, exit status and signals; and it never
//! keeps the program from running: without the library, or the daemon, it runs unmirrored.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Parser;
use memshadow::run::{
    parse_dirty, parse_size, Kinds, RunPolicy, ENV_PRELOAD, PRELOAD_FILE, SOCKET_ENV,
};

/// Runs an unmodified program with memshadow's preload library: its anonymous mappings
/// (mmap, mremap, large malloc blocks, optionally the heap) of at least --min-size bytes are
/// attached to memshadowd, so `memshadowctl` can list, peek, trace and sync them and
/// external engines can read them. Each option's default comes from its environment
/// variable (MEMSHADOW_RUN_*), then the built-in one.
#[derive(Parser, Debug)]
#[command(name = "memshadow-run", version)]
struct Args {
    /// Daemon socket [default: $MEMSHADOW_SOCKET, else the daemon's usual paths]
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Smallest mapping attached: bytes, or with K, M or G [default: $MEMSHADOW_RUN_MIN_SIZE, else 1M]
    #[arg(long, value_parser = parse_size)]
    min_size: Option<usize>,
    /// When written pages are collected: lazy (on `memshadowctl sync`, nothing tracked before the first, which invalidates everything), manual (on sync, tracked from the attach: first writes fault once more), strict (before each device read) or periodic=MS [default: $MEMSHADOW_RUN_DIRTY, else lazy]
    #[arg(long, value_parser = parse_dirty)]
    dirty: Option<memshadow::Policy>,
    /// Kinds of mapping attached: private, shared, malloc, heap, or all [default: $MEMSHADOW_RUN_INCLUDE, else private,shared,malloc]
    #[arg(long, value_parser = Kinds::parse)]
    include: Option<Kinds>,
    /// Kinds left out of those included
    #[arg(long, value_parser = Kinds::parse)]
    exclude: Option<Kinds>,
    /// Append a grant line (`token=HEX pid= mirror= addr= len=`) to FILE for each range attached, for external engines of another user
    #[arg(long, value_name = "FILE")]
    grant_file: Option<PathBuf>,
    /// Programs the program execs run without the library
    #[arg(long)]
    no_follow_exec: bool,
    /// Write nothing to the program's stderr (by default: one line at most, if mirroring fails)
    #[arg(short, long)]
    quiet: bool,
    /// The preload library [default: $MEMSHADOW_PRELOAD, else next to this program, else ../lib/memshadow/]
    #[arg(long, value_name = "PATH")]
    preload: Option<PathBuf>,
    /// The program and its arguments
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let policy = match policy(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("memshadow-run: {e}");
            return ExitCode::from(2);
        }
    };
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    for (k, v) in policy.to_env() {
        cmd.env(k, v);
    }
    if let Some(s) = &args.socket {
        cmd.env(SOCKET_ENV, s);
    }
    match find_preload(args.preload.as_deref()) {
        Ok(lib) => {
            cmd.env("LD_PRELOAD", ld_preload_with(&lib));
        }
        Err(why) if !policy.quiet => {
            eprintln!("memshadow-run: {why}; running the program unmirrored");
        }
        Err(_) => {}
    }
    let e = cmd.exec();
    eprintln!(
        "memshadow-run: {}: {e}",
        Path::new(&args.command[0]).display()
    );
    // As a shell says it: 127 not found, 126 found but not run.
    ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// The environment's policy with the command line's options over it.
fn policy(args: &Args) -> Result<RunPolicy, memshadow::Error> {
    let mut p = RunPolicy::from_env()?;
    if let Some(n) = args.min_size {
        p.min_size = n;
    }
    if let Some(d) = args.dirty {
        p.dirty = d;
    }
    if let Some(k) = args.include {
        p.kinds = k;
    }
    if let Some(k) = args.exclude {
        p.kinds = p.kinds.without(k);
    }
    if let Some(f) = &args.grant_file {
        p.grant_file = Some(std::path::absolute(f).map_err(|e| {
            memshadow::Error::InvalidArgument(format!("grant file {}: {e}", f.display()))
        })?);
    }
    p.quiet |= args.quiet;
    p.follow_exec &= !args.no_follow_exec;
    Ok(p)
}

/// The preload library: the option, `$MEMSHADOW_PRELOAD`, then beside this program (a
/// build's target directory), then the installed layouts (`bin/` beside `lib/memshadow/`).
fn find_preload(given: Option<&Path>) -> Result<PathBuf, String> {
    let given = given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(ENV_PRELOAD).map(PathBuf::from));
    if let Some(p) = given {
        return std::fs::canonicalize(&p).map_err(|e| format!("{}: {e}", p.display()));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let candidates = [
        dir.join(PRELOAD_FILE),
        dir.join("../lib/memshadow").join(PRELOAD_FILE),
        dir.join("../lib").join(PRELOAD_FILE),
    ];
    candidates
        .iter()
        .find_map(|c| std::fs::canonicalize(c).ok())
        .ok_or_else(|| {
            format!(
                "cannot find {PRELOAD_FILE} beside {} or in ../lib/memshadow (give --preload)",
                exe.display()
            )
        })
}

/// `LD_PRELOAD` with the library first (so its `malloc` sees what another preloaded
/// allocator would return, and stands aside for it).
fn ld_preload_with(lib: &Path) -> OsString {
    let mut v = OsString::from(lib);
    if let Some(old) = std::env::var_os("LD_PRELOAD").filter(|o| !o.is_empty()) {
        v.push(":");
        v.push(old);
    }
    v
}
