//! The C ABI end to end: `client-lib/examples/c/demo.c` is built with `cc` and
//! `pkg-config` against the workspace's libmemshadow (shared, then static) through a
//! `memshadow.pc` made from `client-lib/memshadow.pc.in`, and run against a real memshadowd.
//! Needs `cc` and `pkg-config` (fails, does not skip, without them; `.ci/run` installs them).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use memshadow_tests::{bin_dir, Daemon, TempDir};

/// Writes `$OUT/memshadow.pc` for the library in `$LIBDIR` and the workspace's headers.
/// These lines (and `BUILD_SHARED`, `BUILD_STATIC`, `RUN`) run verbatim under `sh` in the
/// workspace root; the README's "Using the C library" section shows the same lines.
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
    for tool in ["cc", "pkg-config"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .expect("run sh")
            .status
            .success();
        assert!(
            found,
            "`{tool}` is not installed: the C API test needs a C compiler and pkg-config \
             (apt-get install gcc pkg-config; .ci/run installs pkg-config)"
        );
    }
}

/// Builds the demo into `out` against the library in `libdir`; `static_` links libmemshadow.a.
fn build_demo(libdir: &Path, out: &Path, static_: bool) -> PathBuf {
    require_tools();
    let o = Command::new("sh")
        .arg("-euc")
        .arg([WRITE_PC, if static_ { BUILD_STATIC } else { BUILD_SHARED }].concat())
        .current_dir(workspace())
        .env("LIBDIR", libdir)
        .env("OUT", out)
        .output()
        .expect("run sh");
    assert!(
        o.status.success(),
        "building the C demo failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        env!("CARGO_PKG_VERSION"),
        "pkg-config --modversion"
    );
    out.join("demo")
}

/// The shared and static library `cargo build --workspace` put in target/<profile>.
fn built_library(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first (the README's test command does)",
        p.display()
    );
    p
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

fn assert_demo_passed(o: &Output) {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "the C demo failed ({}):\n{stdout}{stderr}",
        o.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
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

/// The demo built against libmemshadow.so passes against a real daemon, and fails (exit 1,
/// the error code and message on stderr) when there is no daemon.
#[test]
fn the_c_demo_builds_with_pkg_config_and_passes_against_the_daemon() {
    let so = built_library("libmemshadow.so");
    let libdir = so.parent().unwrap();
    let out = TempDir::new("capi");
    build_demo(libdir, out.path(), false);
    let d = Daemon::start(&[]);
    assert_demo_passed(&run_demo(out.path(), libdir, d.socket()));

    let o = run_demo(out.path(), libdir, &out.path().join("no-daemon.sock"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("memshadow_connect(&client) failed: MEMSHADOW_ERR_CONNECT: cannot connect to memshadowd at "),
        "{stderr}"
    );
}

/// With `pkg-config --static` and only libmemshadow.a in the library dir, the demo links
/// the library in (its binary does not name libmemshadow.so, and the library dir it runs
/// with holds no .so) and passes too.
#[test]
fn the_c_demo_links_statically() {
    let a = built_library("libmemshadow.a");
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
    assert_demo_passed(&run_demo(out.path(), &libdir, d.socket()));
}
