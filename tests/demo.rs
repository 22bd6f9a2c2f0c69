//! The demo of the README's main job (`client-lib/examples/demo.rs`): `--help`, a usage
//! error, a run against a daemon already running (`--socket`, `MEMSHADOW_SOCKET`) that leaves
//! it running, and a run with a daemon of its own on the built-in defaults, whose status
//! shows them, and whose external engine reads from shared memory and acknowledges the
//! invalidations. And the README's engine example (`client-lib/examples/engine.rs`) against
//! a client that rewrites, discards, unmaps and remaps its buffer.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use memshadow_tests::{bin_dir, binary, Daemon};

/// `examples/NAME` of this build; built if `cargo test` did not (a run of only this
/// package's tests builds no example of another).
fn example(name: &str) -> PathBuf {
    let p = bin_dir().join("examples").join(name);
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
            name,
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
        "cargo build --example {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    p
}

/// `examples/demo` of this build.
fn demo() -> PathBuf {
    example("demo")
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
        shows_the_engine_at_work(&out);
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
    shows_the_engine_at_work(&out);
}

/// The external engine's part of the demo's output: it attached, read faster than a device
/// read through the socket, acknowledged the flush of each invalidation, saw the unmapped
/// half refused and the rest still read, and `memshadowctl engines` listed it.
fn shows_the_engine_at_work(out: &str) {
    for want in [
        "== an external engine: a second process (pid ",
        "it attached as engine ",
        "engine read of page 5 -> [5, 5, 5, 5]",
        "engine read of page 8 -> [0, 0, 0, 0]",
        "engine read of the unmapped half is refused: not mirrored",
        "engine read of page 1 -> [1, 1, 1, 1]",
        " invalidation(s) acknowledged, TLB ",
        "== memshadowctl engines\n",
    ] {
        assert!(out.contains(want), "{want:?} in\n{out}");
    }
    // Each invalidation was acknowledged by the engine before its finish pass ended.
    for what in ["madvise", "munmap"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("   engine: acknowledged ")
                    && l.contains(&format!("of its ring after the {what} "))),
            "the engine acknowledged the {what}:\n{out}"
        );
    }
    // `engine: 64-byte reads p50 X ns (...) vs socket read p50 Y us (...)`: the engine reads
    // from its own mapping, far faster than a round trip.
    let line = out
        .lines()
        .find(|l| l.starts_with("engine: 64-byte reads p50 "))
        .unwrap_or_else(|| panic!("no read comparison in\n{out}"));
    let number_after = |key: &str| -> f64 {
        let rest = &line[line.find(key).unwrap() + key.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let engine_ns = number_after("reads p50 ");
    let socket_us = number_after("socket read p50 ");
    assert!(
        engine_ns > 0.0 && engine_ns < socket_us * 1000.0,
        "engine {engine_ns} ns vs socket {socket_us} us: {line}"
    );
    // The `memshadowctl engines` table: the built-in engines, then the external engine's
    // row, attached, with both flushes.
    let table = &out[out.find("== memshadowctl engines\n").unwrap()..];
    let mut rows = table.lines().skip(1);
    let header = rows.next().unwrap();
    assert!(header.trim_start().starts_with("ID "), "{table}");
    let rows: Vec<Vec<&str>> = rows
        .take_while(|l| !l.starts_with("=="))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rows.iter().any(|r| r.last() == Some(&"built-in")),
        "the built-in engines are listed beside: {table}"
    );
    let row = rows
        .iter()
        .find(|r| r.last() == Some(&"attached"))
        .unwrap_or_else(|| panic!("no attached engine: {table}"));
    let flushes: u64 = row[4].parse().unwrap();
    assert!(
        flushes >= 2,
        "FLUSHES: the madvise's and the munmap's: {table}"
    );
    assert_eq!(row[5], "0", "DEPTH: nothing left unacknowledged: {table}");
}

/// The engine example on its own: it starts its client (itself, `--client`), attaches with
/// the client's grant, reads and checksums the mirror for `--seconds`, attaches again after
/// each unmap and remap, and prints a line a second and its totals.
#[test]
fn the_engine_example_follows_a_client_that_remaps_its_buffer() {
    let d = Daemon::start(&[]);
    let o = Command::new(example("engine"))
        .args(["--seconds", "3", "--mib", "1", "--socket"])
        .arg(d.socket())
        .env_remove("MEMSHADOW_SOCKET")
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.starts_with("engine "), "{out}");
    assert!(
        out.contains("attached to mirror 1 (1024 KiB) of its client"),
        "{out}"
    );
    let seconds: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" MB/s  checksum "))
        .collect();
    assert!(!seconds.is_empty(), "a line a second: {out}");
    let totals = out
        .lines()
        .find(|l| l.starts_with("engine: "))
        .unwrap_or_else(|| panic!("no totals: {out}"));
    let count = |key: &str| -> u64 {
        let before = &totals[..totals
            .find(key)
            .unwrap_or_else(|| panic!("{key}: {totals}"))];
        before.split_whitespace().last().unwrap().parse().unwrap()
    };
    assert!(count(" whole passes") >= 1, "{totals}");
    // The client remaps every second: the engine followed it to a new mirror at least once.
    assert!(count(" reattaches") >= 1, "{totals}");
    let client = out
        .lines()
        .find(|l| l.starts_with("client: "))
        .unwrap_or_else(|| panic!("no client line: {out}"));
    assert!(client.contains(" unmaps and remaps"), "{client}");
    // Its client has gone: no bound client is left.
    d.wait_until(
        "the example's client to unbind",
        memshadow_tests::HANG_GUARD,
        || d.counter("server.clients_bound") == 0,
    );
}

#[test]
fn the_engine_example_explains_itself() {
    let o = Command::new(example("engine"))
        .arg("--help")
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        out.contains("usage: engine [--socket PATH] [--seconds N]"),
        "{out}"
    );
    assert!(out.contains("$MEMSHADOW_SOCKET"), "{out}");
    let o = Command::new(example("engine"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown argument \"--frobnicate\""), "{err}");
}
