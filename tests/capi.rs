//! The C ABI end to end: `client-lib/examples/c/demo.c` is built with `cc` and
//! `pkg-config` against the workspace's libmemshadow (shared, then static) through a
//! `memshadow.pc` made from `client-lib/memshadow.pc.in`, and run against a real memshadowd;
//! the shared library's SONAME and exported symbols are checked, and a demo built against it
//! runs with a rebuilt library of a later patch version found through the SONAME link.
//! Needs `cc`, `pkg-config`, `readelf` and `nm` (fails, does not skip, without them;
//! `.ci/run` installs them).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use memshadow_tests::{bin_dir, Daemon, TempDir};

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
