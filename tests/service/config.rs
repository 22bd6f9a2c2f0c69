//! Configuration and logging: the layers (defaults < file < `MEMSHADOW_LOG` < flags), the
//! errors, `--print-config`, a `SIGHUP` reload, and journald detection.

use std::path::Path;

use memshadow_tests::{daemon_command, fields, repo_root, TempDir, TestClient};
use nix::sys::signal::Signal;

use crate::{service_daemon, Notify};

fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = daemon_command(args);
    cmd.env_remove("MEMSHADOW_LOG").arg("--print-config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "--print-config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The configuration body of `--print-config` (without the leading comments).
fn body(printed: &str) -> String {
    printed
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Built-in defaults < file < MEMSHADOW_LOG < flags, shown by `--print-config` and obeyed
/// by a running daemon (flush latency from the file, mirror quota from the flag).
#[test]
fn file_and_flags_precedence() {
    let dir = TempDir::new("precedence");
    let file = dir.write(
        "m.toml",
        "workers = 3\nlog_level = \"warn\"\n[device]\nflush_latency_us = 77\n\
         [quotas]\nmirrors = 3\ninflight = 5\n",
    );
    let f = file.to_str().unwrap();
    let out = print_config(&["--config", f, "--quota-mirrors", "2"], &[]);
    assert!(out.contains(&format!("built-in defaults < {f} < MEMSHADOW_LOG < flags")));
    for line in [
        "workers = 3",
        "flush_latency_us = 77",
        "mirrors = 2",
        "inflight = 5",
        "engines = 2",
        "log_level = \"warn\"",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} in\n{out}");
    }
    let out = print_config(&["--config", f], &[("MEMSHADOW_LOG", "debug")]);
    assert!(out.contains("log_level = \"debug\""), "{out}");
    let out = print_config(
        &["--config", f, "--log-level", "error"],
        &[("MEMSHADOW_LOG", "debug")],
    );
    assert!(out.contains("log_level = \"error\""), "{out}");

    let d = service_daemon()
        .args(["--config", f, "--quota-mirrors", "2"])
        .start();
    assert_eq!(d.status()["engine.flush_latency_target_ns"], 77_000);
    let mut c = TestClient::start(d.socket());
    let l = fields(&c.expect_ok("limits"));
    assert_eq!((l["mirrors"].as_str(), l["inflight"].as_str()), ("2", "5"));
    for m in ["a", "b", "c"] {
        c.expect_ok(&format!("map {m} 1"));
    }
    c.expect_ok("attach a");
    c.expect_ok("attach b");
    let r = c.cmd("attach c");
    assert!(r.starts_with("err quota exceeded"), "{r}");
}

/// Configuration mistakes stop the daemon with one line naming the key and the file.
#[test]
fn configuration_errors_name_the_key_and_the_file() {
    let dir = TempDir::new("config-errors");
    let sock = dir.path().join("d.sock");
    let run = |args: &[&str]| -> String {
        let mut all = args.to_vec();
        all.extend(["--socket", sock.to_str().unwrap()]);
        let out = daemon_command(&all)
            .env_remove("MEMSHADOW_LOG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!sock.exists(), "nothing started");
        err.trim_end().to_owned()
    };
    let f = dir.write(
        "unknown.toml",
        "workers = 2\n[quotas]\nmirrors = 3\nmirorrs = 4\n",
    );
    let e = run(&["--config", f.to_str().unwrap()]);
    assert!(
        e.contains(&format!(
            "ERROR memshadowd: {} line 4: unknown key `quotas.mirorrs` (expected one of",
            f.display()
        )),
        "{e}"
    );
    let f = dir.write("value.toml", "[device]\nmode = \"three-pass\"\n");
    let e = run(&["--config", f.to_str().unwrap()]);
    assert!(
        e.ends_with(&format!(
            "{}: bad value for `device.mode`: \"three-pass\" is not one of one-pass, \
             two-pass, two-pass-batched",
            f.display()
        )),
        "{e}"
    );
    let f = dir.write("type.toml", "[device]\nengines = \"two\"\n");
    let e = run(&["--config", f.to_str().unwrap()]);
    assert!(
        e.contains(&format!(
            "{} line 2: bad value for `device.engines`: invalid type",
            f.display()
        )),
        "{e}"
    );
    let missing = dir.path().join("missing.toml");
    let e = run(&["--config", missing.to_str().unwrap()]);
    assert!(
        e.contains(&format!(
            "cannot read the configuration file {}",
            missing.display()
        )),
        "{e}"
    );
    let e = run(&["--no-config", "--dirty-policy", "sometimes"]);
    assert!(
        e.ends_with("command line: bad value for --dirty-policy: \"sometimes\" is not one of manual, lazy, strict, periodic=MS (MS >= 1)"),
        "{e}"
    );
}

/// `--print-config` reads back to the same configuration, and the shipped example file is
/// exactly the built-in defaults (so its comments cannot drift from the code).
#[test]
fn print_config_round_trips_and_the_example_is_the_defaults() {
    let dir = TempDir::new("print-config");
    let f = dir.write(
        "m.toml",
        "socket = \"/tmp/x/y.sock\"\n[dirty]\npolicy = \"periodic=40\"\n[device]\nmode = \"one-pass\"\n",
    );
    let first = print_config(&["--config", f.to_str().unwrap(), "--engines", "5"], &[]);
    let again_file = dir.write("again.toml", &first);
    let again = print_config(&["--config", again_file.to_str().unwrap()], &[]);
    assert_eq!(body(&first), body(&again));
    for line in [
        "socket = \"/tmp/x/y.sock\"",
        "policy = \"periodic=40\"",
        "mode = \"one-pass\"",
        "engines = 5",
    ] {
        assert!(first.lines().any(|l| l == line), "{line:?} in\n{first}");
    }
    let example = repo_root().join("systemd/memshadowd.toml");
    let env = [("MEMSHADOW_SOCKET", "/x.sock")];
    assert_eq!(
        body(&print_config(
            &["--config", example.to_str().unwrap()],
            &env
        )),
        body(&print_config(&["--no-config"], &env)),
        "systemd/memshadowd.toml must show the built-in defaults"
    );
}

/// SIGHUP: RELOADING=1 (with MONOTONIC_USEC) then READY=1; a lowered mirror quota refuses
/// the next attach of an already bound client; the log level and the flush latency change;
/// changed keys that need a restart are named and not applied; a bad file is reported
/// (key and file) and the running configuration stays.
#[test]
fn sighup_reloads_quotas_log_level_and_flush_latency() {
    let conf = |mirrors: u32, level: &str, latency: u32, engines: u32| {
        format!(
            "log_level = \"{level}\"\n[device]\nengines = {engines}\nflush_latency_us = {latency}\n\
             [quotas]\nmirrors = {mirrors}\n"
        )
    };
    let b = service_daemon();
    let mut n = Notify::new(b.dir().path());
    let f = b.dir().write("m.toml", &conf(4, "warn", 50, 2));
    let d = b
        .args([std::ffi::OsStr::new("--config"), f.as_os_str()])
        .env("NOTIFY_SOCKET", &n.path)
        .spawn();
    let ready = n.wait_for(&d, 0, "READY=1", |l| l == "READY=1");
    let mut c = TestClient::start(d.socket());
    for m in ["a", "b", "c"] {
        c.expect_ok(&format!("map {m} 1"));
    }
    c.expect_ok("attach a");
    c.expect_ok("attach b");
    assert!(
        !d.log().contains("client connected"),
        "no debug lines at log_level = warn"
    );

    std::fs::write(&f, conf(2, "debug", 120, 3)).unwrap();
    d.signal(Signal::SIGHUP);
    let reloading = n.wait_for(&d, ready + 1, "RELOADING=1", |l| l == "RELOADING=1");
    assert!(
        n.msgs[reloading]
            .iter()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{:?}",
        n.msgs[reloading]
    );
    let ready2 = n.wait_for(&d, reloading + 1, "READY=1 after the reload", |l| {
        l == "READY=1"
    });
    let r = c.cmd("attach c");
    assert!(
        r.starts_with("err quota exceeded: mirror quota of 2 ranges reached"),
        "{r}"
    );
    assert_eq!(d.status()["engine.flush_latency_target_ns"], 120_000);
    let err = d.log();
    let applied = err
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        applied.contains("log_level, device.flush_latency_us, quotas.mirrors"),
        "{applied}"
    );
    let refused = err
        .lines()
        .find(|l| l.contains("not applied"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        refused.contains("keys=device.engines") && refused.contains(f.to_str().unwrap()),
        "{refused}"
    );
    // The new log level is in force: a new client's debug line appears.
    let _c2 = TestClient::start(d.socket());
    d.wait_for_log("client connected");

    // A bad file: reported, and nothing changes.
    std::fs::write(&f, "[quotas]\nmirrors = 9\nbogus = 1\n").unwrap();
    d.signal(Signal::SIGHUP);
    let rl = n.wait_for(&d, ready2 + 1, "RELOADING=1", |l| l == "RELOADING=1");
    n.wait_for(&d, rl + 1, "READY=1", |l| l == "READY=1");
    d.wait_for_log("reload failed, the running configuration stays");
    assert!(d.log().contains(&format!(
        "{} line 3: unknown key `quotas.bogus`",
        f.display()
    )));
    let r = c.cmd("attach c");
    assert!(r.starts_with("err quota exceeded"), "{r}");
}

/// `JOURNAL_STREAM` naming stderr selects the journal; where no journal socket exists the
/// daemon says so and logs to stderr. A `JOURNAL_STREAM` naming another file is ignored.
#[test]
fn journald_is_chosen_when_journal_stream_names_stderr() {
    let b = service_daemon();
    let mut n = Notify::new(b.dir().path());
    let d = b.env("NOTIFY_SOCKET", &n.path).journal_stream().spawn();
    n.wait_for(&d, 0, "READY=1", |l| l == "READY=1");
    if Path::new("/run/systemd/journal/socket").exists() {
        // Events went to the journal, none to stderr.
        assert!(!d.log().contains("memshadowd listening"), "{}", d.log());
    } else {
        d.wait_for_log("the journal socket cannot be used; logging to stderr");
        d.wait_for_log("memshadowd listening");
    }
    drop(d);

    let d = service_daemon().env("JOURNAL_STREAM", "0:0").spawn();
    d.wait_for_log("memshadowd listening");
    assert!(
        !d.log().contains("journal socket cannot be used"),
        "{}",
        d.log()
    );
}
