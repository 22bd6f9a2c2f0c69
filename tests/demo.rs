//! The demo of the README's main job (`client-lib/examples/demo.rs`): `--help`, a usage
//! error, a run against a daemon already running (`--socket`, `MEMSHADOW_SOCKET`) that leaves
//! it running, and a run with a daemon of its own on the built-in defaults, whose status
//! shows them.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use memshadow_tests::{bin_dir, binary, Daemon};

/// `examples/demo` of this build; built if `cargo test` did not (a run of only this
/// package's tests builds no example of another).
fn demo() -> PathBuf {
    let p = bin_dir().join("examples/demo");
    if p.exists() {
        return p;
    }
    let profile = bin_dir();
    let mut cargo = memshadow_tests::cargo_command();
    cargo
        .args([
            "build",
            "-p",
            "memshadow",
            "--example",
            "demo",
            "--target-dir",
        ])
        .arg(profile.parent().unwrap())
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap());
    if profile.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    let o = cargo.output().unwrap();
    assert!(
        o.status.success(),
        "cargo build --example demo: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    p
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn demo_help_says_how_to_use_a_running_daemon() {
    let o = Command::new(demo()).arg("--help").output().unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("usage: demo [--socket PATH]"), "{out}");
    assert!(out.contains("$MEMSHADOW_SOCKET"), "{out}");
    assert!(out.contains("--no-config"), "{out}");
    let o = Command::new(demo()).arg("--frobnicate").output().unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "a usage error: {err}");
    assert!(
        err.contains("unknown argument \"--frobnicate\" (see demo --help)"),
        "{err}"
    );
}

#[test]
fn demo_uses_a_running_daemon_and_leaves_it_running() {
    let d = Daemon::start(&[]);
    let sock = d.socket().display().to_string();
    for (how, env) in [("--socket", None), ("MEMSHADOW_SOCKET", Some(&sock))] {
        let before = d.counter("server.sessions_total");
        let mut c = Command::new(demo());
        c.env_remove("MEMSHADOW_SOCKET");
        match env {
            Some(e) => c.env("MEMSHADOW_SOCKET", e),
            None => c.args(["--socket", &sock]),
        };
        let o = c.output().unwrap();
        let (out, err) = text(&o);
        assert!(o.status.success(), "demo via {how}: {out}{err}");
        assert!(
            out.contains(&format!(
                "== using the memshadowd at {sock} (from {how}); it keeps running"
            )),
            "{out}"
        );
        assert!(!out.contains("starting memshadowd"), "{out}");
        assert!(!out.contains("stopping memshadowd"), "{out}");
        assert!(out.contains(&format!("socket          {sock}\n")), "{out}");
        assert!(
            d.counter("server.sessions_total") > before,
            "the demo talked to this daemon"
        );
    }
    // Still running.
    assert!(d.counter("server.uptime_ms") > 0);
}

#[test]
fn demo_without_a_socket_starts_its_own_daemon_on_the_defaults() {
    let o = Command::new(demo())
        .env_remove("MEMSHADOW_SOCKET")
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("(built-in defaults: --no-config)"), "{out}");
    // The defaults its status shows are the daemon's (tests/defaults.rs checks the
    // documentation against the same).
    let config = Command::new(binary("memshadowd"))
        .args(["--no-config", "--print-config"])
        .env_remove("MEMSHADOW_LOG")
        .output()
        .unwrap();
    let config = String::from_utf8_lossy(&config.stdout);
    let latency = config
        .lines()
        .find_map(|l| l.strip_prefix("flush_latency_us = "))
        .unwrap();
    assert!(
        out.contains(&format!(", flush latency {latency} us, ")),
        "{out}"
    );
    assert!(out.contains("memshadowd stopped: exit status: 0"), "{out}");
}
