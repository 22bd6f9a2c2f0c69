//! The C ABI end to end: `client-lib/examples/c/demo.c` is built with `cc` and
//! `pkg-config` against the workspace's libmemshadow (shared, then static) through a
//! `memshadow.pc` made from `client-lib/memshadow.pc.in`, and run against a real memshadowd;
//! the shared library's SONAME and exported symbols are checked, and a demo built against it
//! runs with a rebuilt library of a later patch version found through the SONAME link.
//! The examples of external engines, `grant.c` (a client that grants its buffer) and
//! `engine.c`, are built the same way and run against each other, and the functions added
//! after 0.1 are checked to be in the version script's node of their minor version.
//! Needs `cc`, `pkg-config`, `readelf` and `nm` (fails, does not skip, without them;
//! `.ci/run` installs them).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

use memshadow_tests::{bin_dir, fields, skip, Daemon, TempDir};

/// What programs load: `libmemshadow.so.MAJOR`, the SONAME `client-lib/capi/build.rs` gives.
const SONAME: &str = concat!("libmemshadow.so.", env!("CARGO_PKG_VERSION_MAJOR"));

/// Makes `$LIBDIR` a library directory for the library cargo built in `$BUILT`, laid out as
/// an install lays it out: `libmemshadow.so.0`, the SONAME programs load at run time, and
/// `libmemshadow.so`, the name `-lmemshadow` finds when they are linked. These lines (and
/// `WRITE_PC`, `BUILD_SHARED`, `BUILD_STATIC`, `RUN`) run verbatim under `sh` in the
/// workspace root; docs/usage.md's "The C library" section shows the same lines.
const LINK_LIBDIR: &str = r#"
mkdir -p "$LIBDIR"
ln -sf "$BUILT/libmemshadow.so" "$LIBDIR/libmemshadow.so.0"
ln -sf libmemshadow.so.0 "$LIBDIR/libmemshadow.so"
"#;

/// Writes `$OUT/memshadow.pc` for the library in `$LIBDIR` and the workspace's headers.
const WRITE_PC: &str = r#"
sed -e "s|@PREFIX@|$PWD|" -e "s|@LIBDIR@|$LIBDIR|" -e "s|@INCLUDEDIR@|$PWD/client-lib/include|" -e "s|@VERSION@|$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml)|" client-lib/memshadow.pc.in > "$OUT/memshadow.pc"
export PKG_CONFIG_PATH="$OUT"
pkg-config --modversion memshadow
"#;

/// Builds the demo against libmemshadow.so.
const BUILD_SHARED: &str = r#"
cc -std=c99 -Wall -Wextra -pedantic -Werror -o "$OUT/demo" client-lib/examples/c/demo.c $(pkg-config --cflags --libs memshadow)
"#;

/// Builds the demo against libmemshadow.a.
const BUILD_STATIC: &str = r#"
cc -std=c99 -Wall -Wextra -pedantic -Werror -o "$OUT/demo" client-lib/examples/c/demo.c $(pkg-config --static --cflags --libs memshadow)
"#;

/// Runs the demo against the daemon at `$SOCKET`.
const RUN: &str = r#"
LD_LIBRARY_PATH="$LIBDIR" MEMSHADOW_SOCKET="$SOCKET" "$OUT/demo"
"#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn require_tools() {
    for tool in ["cc", "pkg-config", "readelf", "nm"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .expect("run sh")
            .status
            .success();
        assert!(
            found,
            "`{tool}` is not installed: the C API test needs a C compiler, pkg-config and \
             binutils (apt-get install gcc pkg-config binutils; .ci/run installs them)"
        );
    }
}

/// Runs `script` under `sh -eu` in the workspace root with `env`; requires success and
/// returns its stdout.
fn sh(script: &str, env: &[(&str, &Path)]) -> String {
    let mut c = Command::new("sh");
    c.arg("-euc").arg(script).current_dir(workspace());
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run sh");
    assert!(
        o.status.success(),
        "{script}failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A library directory at `out/lib` for the shared library cargo built (`LINK_LIBDIR`).
fn link_libdir(out: &Path) -> PathBuf {
    let libdir = out.join("lib");
    sh(
        LINK_LIBDIR,
        &[
            ("LIBDIR", &libdir),
            ("BUILT", &built_library("libmemshadow.so")),
        ],
    );
    libdir
}

/// Builds the demo into `out` against the library in `libdir`; `static_` links libmemshadow.a.
fn build_demo(libdir: &Path, out: &Path, static_: bool) -> PathBuf {
    require_tools();
    let stdout = sh(
        &[WRITE_PC, if static_ { BUILD_STATIC } else { BUILD_SHARED }].concat(),
        &[("LIBDIR", libdir), ("OUT", out)],
    );
    assert_eq!(
        stdout.trim(),
        env!("CARGO_PKG_VERSION"),
        "pkg-config --modversion"
    );
    out.join("demo")
}

/// The directory where `cargo build --workspace` put the shared and static library
/// (target/<profile>), checking that `name` is there.
fn built_library(name: &str) -> PathBuf {
    let dir = bin_dir();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first (the README's test command does)",
        p.display()
    );
    dir
}

/// Runs `RUN` with the demo in `out`, the library in `libdir` and the daemon at `socket`.
fn run_demo(out: &Path, libdir: &Path, socket: &Path) -> Output {
    Command::new("sh")
        .arg("-euc")
        .arg(RUN)
        .current_dir(workspace())
        .env("OUT", out)
        .env("LIBDIR", libdir)
        .env("SOCKET", socket)
        .output()
        .expect("run the C demo")
}

/// Checks the demo's run; `runtime` is the library version it should report (the header's
/// is always this crate's).
fn assert_demo_passed(o: &Output, runtime: &str) {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "the C demo failed ({}):\n{stdout}{stderr}",
        o.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let versions = format!(
        "libmemshadow {runtime}, built against {}",
        env!("CARGO_PKG_VERSION")
    );
    for want in [
        versions.as_str(),
        "connected: memshadowd ",
        "device read: all ",
        "populated: 64 pages in the shadow",
        "after a write and a sync: 1 page(s) found written, the device reads the new bytes",
        "read past the end: MEMSHADOW_ERR_BAD_RANGE (bad range: ",
        "after MADV_DONTNEED: no old bytes",
        "after munmap: read of the tail fails with MEMSHADOW_ERR_NOT_MIRRORED (not mirrored: ",
        "page 0 still reads back",
        "  client.reads = ",
        "detached: a read now fails with MEMSHADOW_ERR_NO_SUCH_MIRROR",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "no line starting with {want:?} in:\n{stdout}"
        );
    }
    assert_eq!(lines.last(), Some(&"demo ok"), "{stdout}");
}

/// `readelf -d` of `file`: its dynamic section.
fn dynamic_section(file: &Path) -> String {
    let o = Command::new("readelf")
        .arg("-d")
        .arg(file)
        .output()
        .expect("run readelf");
    assert!(o.status.success(), "readelf -d {}", file.display());
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The SONAME of a shared library (`readelf -d`), if it has one.
fn soname(lib: &Path) -> Option<String> {
    dynamic_section(lib).lines().find_map(|l| {
        let (_, rest) = l.split_once("(SONAME)")?;
        let name = rest.split_once('[')?.1.split_once(']')?.0;
        Some(name.to_owned())
    })
}

/// The demo built against libmemshadow.so (through the `libmemshadow.so` link of a library
/// directory laid out as an install lays it out) needs `libmemshadow.so.0`, passes against
/// a real daemon, and fails (exit 1, the error code, message and errno on stderr) when there
/// is no daemon.
#[test]
fn the_c_demo_builds_with_pkg_config_and_passes_against_the_daemon() {
    let out = TempDir::new("capi");
    let libdir = link_libdir(out.path());
    let demo = build_demo(&libdir, out.path(), false);
    assert!(
        dynamic_section(&demo).contains(&format!("Shared library: [{SONAME}]")),
        "the demo does not need {SONAME}:\n{}",
        dynamic_section(&demo)
    );
    let d = Daemon::start(&[]);
    assert_demo_passed(
        &run_demo(out.path(), &libdir, d.socket()),
        env!("CARGO_PKG_VERSION"),
    );

    let o = run_demo(out.path(), &libdir, &out.path().join("no-daemon.sock"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("memshadow_connect(&client) failed: MEMSHADOW_ERR_CONNECT: cannot connect to memshadowd at "),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("(errno {})", libc::ENOENT)),
        "memshadow_last_errno() is connect's ENOENT: {stderr}"
    );
}

/// With `pkg-config --static` and only libmemshadow.a in the library dir, the demo links
/// the library in (its binary does not name libmemshadow.so, and the library dir it runs
/// with holds no .so) and passes too.
#[test]
fn the_c_demo_links_statically() {
    let a = built_library("libmemshadow.a").join("libmemshadow.a");
    let out = TempDir::new("capi-static");
    let libdir = out.path().join("lib");
    std::fs::create_dir(&libdir).unwrap();
    std::os::unix::fs::symlink(&a, libdir.join("libmemshadow.a")).unwrap();
    let demo = build_demo(&libdir, out.path(), true);
    let binary = std::fs::read(&demo).unwrap();
    assert!(
        !binary
            .windows(b"libmemshadow.so".len())
            .any(|w| w == b"libmemshadow.so"),
        "the static demo still refers to libmemshadow.so"
    );
    let d = Daemon::start(&[]);
    assert_demo_passed(
        &run_demo(out.path(), &libdir, d.socket()),
        env!("CARGO_PKG_VERSION"),
    );
}

/// The functions `client-lib/include/memshadow.h` declares.
fn declared_functions() -> BTreeSet<String> {
    let header = std::fs::read_to_string(workspace().join("client-lib/include/memshadow.h"))
        .expect("read client-lib/include/memshadow.h");
    let mut names = BTreeSet::new();
    for (i, _) in header.match_indices("memshadow_") {
        let name: String = header[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if header[i + name.len()..].starts_with('(') {
            names.insert(name);
        }
    }
    names
}

/// `readelf -d`: the library cargo built has the SONAME `libmemshadow.so.0`. `nm -D
/// --defined-only`: it exports the functions of the header and nothing else (no Rust
/// symbol, no dependency's).
#[test]
fn the_library_has_its_soname_and_exports_only_the_c_api() {
    require_tools();
    let so = built_library("libmemshadow.so").join("libmemshadow.so");
    assert_eq!(
        soname(&so).as_deref(),
        Some(SONAME),
        "readelf -d {}",
        so.display()
    );
    let o = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&so)
        .output()
        .expect("run nm");
    assert!(o.status.success(), "nm -D --defined-only {}", so.display());
    let nm = String::from_utf8_lossy(&o.stdout);
    // `ADDRESS TYPE NAME`, NAME perhaps with a version (`@@MEMSHADOW_0`); the version
    // node itself, if listed, is an absolute (`A`) symbol.
    let exported: BTreeSet<String> = nm
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (kind, name) = (f.nth(1)?, f.next()?);
            let name = name.split('@').next()?;
            (kind != "A").then(|| name.to_owned())
        })
        .collect();
    let stray: Vec<&String> = exported
        .iter()
        .filter(|n| !n.starts_with("memshadow_"))
        .collect();
    assert!(
        stray.is_empty(),
        "exported besides the C API: {stray:?}\n{nm}"
    );
    let declared = declared_functions();
    assert!(declared.len() >= 20, "{declared:?}");
    assert_eq!(exported, declared, "nm -D against the header's functions");
}

/// A copy of the workspace's sources at `dir` with memshadow-capi's version `version`
/// (everything else unchanged), built into `target` (kept between runs, so a rerun only
/// rebuilds what changed); returns the shared library it built.
fn build_library_copy(dir: &Path, target: &Path, version: &str) -> PathBuf {
    let root = workspace();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    // `cp -a` keeps the files' times, so cargo sees unchanged sources as unchanged.
    let copied = Command::new("cp")
        .arg("-a")
        .args(["Cargo.toml", "Cargo.lock", "proto", "client-lib"])
        .arg(dir)
        .current_dir(&root)
        .status()
        .expect("run cp");
    assert!(copied.success(), "copy the sources to {}", dir.display());
    let manifest = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let members = text
        .lines()
        .find(|l| l.starts_with("members = "))
        .expect("the workspace's members line");
    std::fs::write(
        &manifest,
        text.replace(
            members,
            r#"members = ["proto", "client-lib", "client-lib/capi"]"#,
        ),
    )
    .unwrap();
    let capi = dir.join("client-lib/capi/Cargo.toml");
    let text = std::fs::read_to_string(&capi).unwrap();
    assert!(text.contains("\nversion.workspace = true\n"), "{text}");
    std::fs::write(
        &capi,
        text.replace(
            "\nversion.workspace = true\n",
            &format!("\nversion = \"{version}\"\n"),
        ),
    )
    .unwrap();
    let mut cargo = memshadow_tests::cargo_command();
    cargo
        .args(["build", "--offline", "-p", "memshadow-capi", "--lib"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target);
    let o = cargo.output().expect("run cargo");
    assert!(
        o.status.success(),
        "cargo build of the library copy with version {version} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    target.join("debug/libmemshadow.so")
}

/// A C program built against the library keeps working against a rebuilt one: the demo,
/// linked with the workspace's library (0.x.y), runs with a copy of the library built from
/// the same sources at version 0.x.(y+1), installed as an install does it
/// (`libmemshadow.so.0.x.(y+1)` and the SONAME link `libmemshadow.so.0`, no
/// `libmemshadow.so`), and reports that version at run time. Without the SONAME link it
/// does not start.
#[test]
fn a_program_built_against_the_library_runs_with_a_rebuilt_one() {
    let out = TempDir::new("capi-abi");
    let old_libdir = link_libdir(out.path());
    build_demo(&old_libdir, out.path(), false);

    let (major, minor, patch) = (
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH").parse::<u32>().unwrap(),
    );
    let newer = format!("{major}.{minor}.{}", patch + 1);
    let work = bin_dir()
        .parent()
        .expect("the target directory")
        .join("capi-abi");
    let rebuilt = build_library_copy(&work.join("src"), &work.join("target"), &newer);
    assert_eq!(
        soname(&rebuilt).as_deref(),
        Some(SONAME),
        "the rebuilt library"
    );

    let new_libdir = out.path().join("new");
    std::fs::create_dir(&new_libdir).unwrap();
    let real = format!("libmemshadow.so.{newer}");
    std::fs::copy(&rebuilt, new_libdir.join(&real)).unwrap();
    std::os::unix::fs::symlink(&real, new_libdir.join(SONAME)).unwrap();
    let d = Daemon::start(&[]);
    assert_demo_passed(&run_demo(out.path(), &new_libdir, d.socket()), &newer);

    // The program looks for the SONAME, not for the name it was linked with.
    let unversioned = out.path().join("unversioned");
    std::fs::create_dir(&unversioned).unwrap();
    std::fs::copy(&rebuilt, unversioned.join("libmemshadow.so")).unwrap();
    let o = run_demo(out.path(), &unversioned, d.socket());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "ran without {SONAME}");
    assert!(stderr.contains(SONAME), "{stderr}");
}

/// Builds the C examples `$PROGS` (`client-lib/examples/c/PROG.c`: `grant` a client that
/// grants, `engine`, `regcache` a registration cache) into `$OUT` against libmemshadow.so,
/// as the demo is built (with `-pthread`: `regcache` has threads).
const BUILD_EXAMPLES: &str = r#"
for prog in $PROGS; do
  cc -std=c99 -Wall -Wextra -pedantic -Werror -pthread -o "$OUT/$prog" "client-lib/examples/c/$prog.c" $(pkg-config --cflags --libs memshadow)
done
"#;

/// Page size of the daemon (it refuses to start on another).
const PAGE: usize = 4096;

/// C examples, built into a temporary directory.
struct CExamples {
    out: TempDir,
    libdir: PathBuf,
}

impl CExamples {
    /// Builds the examples `progs`.
    fn build(progs: &[&str]) -> CExamples {
        require_tools();
        let out = TempDir::new("capi-examples");
        let libdir = link_libdir(out.path());
        let progs = PathBuf::from(progs.join(" "));
        sh(
            &[WRITE_PC, BUILD_EXAMPLES].concat(),
            &[("LIBDIR", &libdir), ("OUT", out.path()), ("PROGS", &progs)],
        );
        CExamples { out, libdir }
    }

    /// The examples of external engines: `grant` and `engine`.
    fn engines() -> CExamples {
        CExamples::build(&["grant", "engine"])
    }

    /// A command running example `prog` against the daemon `d`.
    fn command(&self, prog: &str, d: &Daemon, args: &[&str]) -> Command {
        let mut c = Command::new(self.out.path().join(prog));
        c.env("LD_LIBRARY_PATH", &self.libdir)
            .arg("--socket")
            .arg(d.socket())
            .args(args);
        c
    }

    /// Starts `grant` (a client that mirrors a buffer and grants it) and reads its first
    /// line.
    fn granter(&self, d: &Daemon, args: &[&str]) -> Granter {
        let mut child = self
            .command("grant", d, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run the grant example");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("grant's stdout"));
        let mut g = Granter {
            child: Killed(child),
            stdin,
            stdout,
            first: HashMap::new(),
        };
        let first = g.line();
        g.first = fields(&first);
        for key in ["token", "pid", "mirror", "bytes"] {
            assert!(g.first.contains_key(key), "grant's first line: {first:?}");
        }
        assert_eq!(g.first["token"].len(), 32, "{first}");
        g
    }

    /// Runs `engine` to its end; `--seconds 60` bounds its run (its passes or flushes
    /// target, if given, ends it first).
    fn engine(&self, d: &Daemon, args: &[&str]) -> Output {
        self.command("engine", d, args)
            .args(["--seconds", "60"])
            .output()
            .expect("run the engine example")
    }
}

/// A child process killed (and reaped) when dropped, if it still runs.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The grant example, running: a client whose buffer (page i filled with i % 251 + 1) is
/// granted; it answers commands on its stdin.
struct Granter {
    child: Killed,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// `token`, `pid`, `mirror`, `bytes`, of its first line.
    first: HashMap<String, String>,
}

impl Granter {
    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .expect("read grant's stdout");
        assert!(
            n > 0,
            "the grant example ended early (see its stderr above)"
        );
        line.trim_end().to_owned()
    }

    /// Sends one command and returns its answer.
    fn ask(&mut self, command: &str) -> String {
        let stdin = self.stdin.as_mut().expect("grant's stdin");
        writeln!(stdin, "{command}").expect("write to grant");
        stdin.flush().expect("write to grant");
        self.line()
    }

    fn token(&self) -> &str {
        &self.first["token"]
    }

    /// The bytes of its buffer as it filled it.
    fn pattern(&self) -> Vec<u8> {
        let bytes: usize = self.first["bytes"].parse().unwrap();
        (0..bytes).map(|i| (i / PAGE % 251 + 1) as u8).collect()
    }

    /// Ends its input: it detaches (revoking its grants) and exits 0.
    fn finish(mut self) {
        drop(self.stdin.take());
        assert_eq!(self.line(), "detached");
        let status = self.child.0.wait().expect("wait for grant");
        assert!(status.success(), "grant exited with {status}");
    }
}

/// The checksum of engine.c: FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The stdout of a successful run of the engine example, and the fields of its `done:` line.
fn engine_done(o: &Output) -> (String, HashMap<String, String>) {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "the engine example failed ({}):\n{stdout}{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let done = stdout
        .lines()
        .find(|l| l.starts_with("done: "))
        .unwrap_or_else(|| panic!("no done: line in\n{stdout}"));
    let f = fields(done);
    (stdout, f)
}

/// The stderr of a run of the engine example that failed with exit code 1.
fn engine_failed(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{stderr}{}",
        String::from_utf8_lossy(&o.stdout)
    );
    stderr
}

/// The C engine example attaches with the token the C client example granted (and, for
/// the daemon's own user, by pid and mirror id) and reads what the client wrote; a wrong
/// token, and the right one after the client detached, are `MEMSHADOW_ERR_NO_SUCH_GRANT`.
#[test]
fn a_c_engine_reads_what_a_c_client_granted() {
    let ex = CExamples::engines();
    let d = Daemon::start(&[]);
    let client = ex.granter(&d, &["--pages", "16"]);
    let token = client.token().to_owned();
    let want = format!("{:016x}", fnv1a(&client.pattern()));

    let (stdout, done) = engine_done(&ex.engine(&d, &[&token, "--passes", "2"]));
    let attached = format!(
        " attached to mirror {}: {} bytes at 0x",
        client.first["mirror"], client.first["bytes"]
    );
    assert!(stdout.contains(&attached), "{stdout}");
    assert!(
        stdout.contains(&format!("first pass: checksum {want}, ")),
        "{stdout}"
    );
    assert_eq!(done["passes"], "2");
    assert_eq!(done["checksum"], want, "{stdout}");
    let bytes: usize = client.first["bytes"].parse().unwrap();
    assert_eq!(done["bytes"], (2 * bytes).to_string());

    let (pid, mirror) = (&client.first["pid"], &client.first["mirror"]);
    let by_pid = [
        "--pid",
        pid.as_str(),
        "--mirror",
        mirror.as_str(),
        "--passes",
        "1",
    ];
    let (_, done) = engine_done(&ex.engine(&d, &by_pid));
    assert_eq!(done["checksum"], want, "attached by pid");

    let wrong = u128::from_str_radix(&token, 16).unwrap() ^ 1;
    let stderr = engine_failed(&ex.engine(&d, &[&format!("{wrong:032x}")]));
    assert!(
        stderr.contains(
            "memshadow_engine_attach failed: MEMSHADOW_ERR_NO_SUCH_GRANT: no such grant: "
        ),
        "{stderr}"
    );
    let stderr = engine_failed(&ex.engine(&d, &["not-a-token"]));
    assert!(
        stderr.contains("memshadow_token_from_hex failed: MEMSHADOW_ERR_INVALID_ARGUMENT: "),
        "{stderr}"
    );

    client.finish();
    let stderr = engine_failed(&ex.engine(&d, &[&token, "--passes", "1"]));
    assert!(
        stderr.contains("MEMSHADOW_ERR_NO_SUCH_GRANT"),
        "the grant is revoked with the detach: {stderr}"
    );
}

/// A device write of the C engine lands in the memory of a client that connected with
/// `MEMSHADOW_CONNECT_DEVICE_WRITES`, and the engine's next read sees it; a client that did
/// not allow it keeps its byte, and the write fails.
#[test]
fn a_c_engine_writes_into_a_client_that_allows_device_writes() {
    let ex = CExamples::engines();
    let d = Daemon::start(&[]);
    let mut client = ex.granter(&d, &["--pages", "4", "--device-writes"]);
    let mut want = client.pattern();
    want[5000] = 171;
    let o = ex.engine(
        &d,
        &[client.token(), "--write", "5000", "171", "--passes", "1"],
    );
    let (stdout, done) = engine_done(&o);
    assert!(
        stdout.contains("wrote 1 byte(s) at offset 5000"),
        "{stdout}"
    );
    assert_eq!(
        done["checksum"],
        format!("{:016x}", fnv1a(&want)),
        "{stdout}"
    );
    assert_eq!(client.ask("peek 5000"), "peek 5000 171");
    client.finish();

    let mut other = ex.granter(&d, &["--pages", "4"]);
    let o = ex.engine(
        &d,
        &[other.token(), "--write", "5000", "171", "--passes", "1"],
    );
    let stderr = engine_failed(&o);
    assert!(
        stderr.contains("memshadow_engine_write failed: MEMSHADOW_ERR_"),
        "{stderr}"
    );
    assert_eq!(other.ask("peek 5000"), "peek 5000 2", "page 1 holds 2s");
    other.finish();
}

/// The C engine, idle between passes on its doorbell (`memshadow_engine_fd`, poll(2)),
/// acknowledges the flush of a page the client wrote and collected, and its next pass reads
/// the new bytes. Ordered by the engine's "first pass" line and the client's answer, not by
/// time.
#[test]
fn a_c_engine_waiting_on_its_doorbell_sees_the_flush_and_the_new_bytes() {
    let ex = CExamples::engines();
    let d = Daemon::start(&[]);
    let mut client = ex.granter(&d, &["--pages", "16"]);
    let mut engine = Killed(
        ex.command(
            "engine",
            &d,
            &[
                client.token(),
                "--interval",
                "20",
                "--until-flushes",
                "1",
                "--seconds",
                "60",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the engine example"),
    );
    let mut lines = BufReader::new(engine.0.stdout.take().expect("engine's stdout"));
    let mut seen = String::new();
    while !seen.lines().any(|l| l.starts_with("first pass: ")) {
        let n = lines.read_line(&mut seen).expect("read engine's stdout");
        assert!(n > 0, "the engine ended before its first pass:\n{seen}");
    }
    let want = fnv1a(&client.pattern());
    assert!(
        seen.contains(&format!("first pass: checksum {want:016x}")),
        "{seen}"
    );

    let answer = client.ask("write 3 200");
    if answer.starts_with("write 3: MEMSHADOW_ERR_UNSUPPORTED") {
        skip(format!(
            "no dirty tracking here, so no flush to see ({answer})"
        ));
        return;
    }
    assert!(answer.starts_with("wrote 3: "), "{answer}");
    lines
        .read_to_string(&mut seen)
        .expect("read engine's stdout");
    let mut stderr = Vec::new();
    if let Some(mut e) = engine.0.stderr.take() {
        e.read_to_end(&mut stderr).expect("read engine's stderr");
    }
    let status = engine.0.wait().expect("wait for the engine");
    let o = Output {
        status,
        stdout: seen.into_bytes(),
        stderr,
    };
    let (stdout, done) = engine_done(&o);
    let flushes: u64 = done["flushes"].parse().unwrap();
    assert!(flushes >= 1, "{stdout}");
    let mut written = client.pattern();
    written[3 * PAGE..4 * PAGE].fill(200);
    assert_eq!(
        done["checksum"],
        format!("{:016x}", fnv1a(&written)),
        "{stdout}"
    );
    client.finish();
}

/// The functions the header documents as added in a minor version ("Since 0.y."), by
/// version, and the others.
fn functions_by_version() -> (BTreeSet<String>, HashMap<String, BTreeSet<String>>) {
    let header = std::fs::read_to_string(workspace().join("client-lib/include/memshadow.h"))
        .expect("read client-lib/include/memshadow.h");
    let (mut base, mut since) = (BTreeSet::new(), HashMap::<String, BTreeSet<String>>::new());
    for block in header.split("/**").skip(1) {
        let Some((doc, rest)) = block.split_once("*/") else {
            continue;
        };
        let decl = rest.split(';').next().unwrap_or_default();
        let Some(name) = decl
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .find(|w| w.starts_with("memshadow_") && decl.contains(&format!("{w}(")))
        else {
            continue;
        };
        let version = doc
            .split("Since ")
            .nth(1)
            .map(|v| v.split(|c: char| !(c.is_ascii_digit() || c == '.')).next());
        match version.flatten() {
            Some(v) => since
                .entry(v.trim_end_matches('.').to_owned())
                .or_default()
                .insert(name.to_owned()),
            None => base.insert(name.to_owned()),
        };
    }
    (base, since)
}

/// The names a version node of `client-lib/capi/memshadow.map` lists, and the node it
/// inherits.
fn version_node(map: &str, node: &str) -> (BTreeSet<String>, Option<String>) {
    let start = map
        .find(&format!("\n{node} {{"))
        .unwrap_or_else(|| panic!("memshadow.map has no node {node}"));
    let body = &map[start..];
    let end = body.find('}').expect("the node's end");
    let names = body[..end]
        .split(|c: char| c == ';' || c.is_whitespace())
        .filter(|w| w.starts_with("memshadow_"))
        .map(str::to_owned)
        .collect();
    let parent = body[end + 1..]
        .split(';')
        .next()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    (names, parent)
}

/// What the header says each minor version added ("Since 0.2.") is what the version script
/// lists in that version's node, `MEMSHADOW_0.2`, which inherits `MEMSHADOW_0` (whose pattern
/// covers the functions of 0.1).
#[test]
fn the_version_script_has_a_node_for_each_minor_version_with_what_it_added() {
    let map = std::fs::read_to_string(workspace().join("client-lib/capi/memshadow.map"))
        .expect("read client-lib/capi/memshadow.map");
    let (base, since) = functions_by_version();
    assert!(base.contains("memshadow_connect"), "{base:?}");
    let added = since.get("0.2").cloned().unwrap_or_default();
    for f in [
        "memshadow_mirror_grant",
        "memshadow_engine_attach",
        "memshadow_engine_read",
        "memshadow_connect_with",
    ] {
        assert!(
            added.contains(f),
            "{f} does not say \"Since 0.2.\": {added:?}"
        );
    }
    assert_eq!(
        since.keys().collect::<Vec<_>>(),
        ["0.2"],
        "a node per minor version"
    );
    let (listed, parent) = version_node(&map, "MEMSHADOW_0.2");
    assert_eq!(
        listed, added,
        "MEMSHADOW_0.2 against the header's \"Since 0.2.\""
    );
    assert_eq!(parent.as_deref(), Some("MEMSHADOW_0"));
    let (_, parent) = version_node(&map, "MEMSHADOW_0");
    assert_eq!(parent, None);
}

/// Runs the registration cache example against `d`; returns its exit code and its counters.
fn run_regcache(ex: &CExamples, d: &Daemon, args: &[&str]) -> (Option<i32>, HashMap<String, u64>) {
    let o = ex.command("regcache", d, args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let counters = stdout
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect();
    assert!(
        o.stderr.is_empty(),
        "regcache: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code(), counters)
}

/// Issue 17's registration cache under malloc/free churn, `free()` unmapping (a lowered
/// `M_MMAP_THRESHOLD`), 4 threads reusing addresses: with monitors it never hands out a
/// registration of an older buffer whose `free()` had returned before the lookup began, and
/// it hits; without (the same cache trusting its entries) it does, which is what the check
/// is worth. Hits on a buffer whose `free()` is still running in another thread
/// (`reused_in_flight`) are counted apart: no monitor outside the kernel can see those
/// (docs/monitors.md).
#[test]
fn the_registration_cache_never_hands_out_a_stale_entry() {
    let ex = CExamples::build(&["regcache"]);
    let d = Daemon::start(&[]);
    let (code, c) = run_regcache(&ex, &d, &["--rounds", "5000"]);
    assert_eq!(code, Some(0), "{c:?}");
    assert_eq!(c["stale"], 0, "{c:?}");
    eprintln!("regcache: {c:?}");
    assert_eq!(c["lookups"], 20_000, "{c:?}");
    assert!(c["hits"] > 0 && c["misses"] > 0, "{c:?}");
    assert!(
        c["dropped_invalid"] + c["dropped_by_event"] > 0,
        "freed buffers were dropped: {c:?}"
    );
    let (code, c) = run_regcache(&ex, &d, &["--rounds", "5000", "--no-monitor"]);
    assert_eq!(code, Some(1), "{c:?}");
    assert!(
        c["stale"] > 0,
        "without monitors the cache goes stale: {c:?}"
    );
}
