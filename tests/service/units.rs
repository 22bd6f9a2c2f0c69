//! The units against the tools and the daemon: `systemd-analyze verify` finds nothing to say;
//! the capabilities and the system-call filter are what the daemon really uses.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use memshadow_tests::{
    binary, children, fields, needs_root, tool, wait_until, TempDir, TestClient, HANG_GUARD,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{service_daemon, unit, unit_values, Notify};

/// The unit files pass `systemd-analyze verify` with no output at all. It exits 0 even on
/// unknown keys, so any output fails; it also insists that `ExecStart=` exists, so the
/// check runs on copies pointing at the built daemon (the only line changed). Controls show
/// that the same check does report a misspelt key and a missing binary.
#[test]
fn units_pass_systemd_analyze_verify_with_no_output() {
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    let dir = TempDir::new("units");
    let exec = "ExecStart=/usr/local/bin/memshadowd";
    let service = unit("memshadowd.service");
    assert_eq!(
        service.lines().filter(|l| *l == exec).count(),
        1,
        "the service has one `{exec}` line (install.sh rewrites it)"
    );
    let built = format!("ExecStart={}", binary("memshadowd").display());
    let verify = |service_text: &str| -> (bool, String) {
        std::fs::write(dir.path().join("memshadowd.service"), service_text).unwrap();
        std::fs::write(
            dir.path().join("memshadowd.socket"),
            unit("memshadowd.socket"),
        )
        .unwrap();
        let out = Command::new(&analyze)
            .arg("verify")
            .arg("--man=no")
            .arg(dir.path().join("memshadowd.socket"))
            .arg(dir.path().join("memshadowd.service"))
            .env("SYSTEMD_LOG_TARGET", "console")
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = verify(&service.replace(exec, &built));
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify must print nothing; it printed:\n{text}"
    );
    let misspelt = service
        .replace(exec, &built)
        .replace("NoNewPrivileges=yes", "NoNewPrivilege=yes");
    let (_, text) = verify(&misspelt);
    assert!(
        text.contains("NoNewPrivilege"),
        "control: a misspelt key must be reported:\n{text}"
    );
    let (_, text) = verify(&service);
    assert!(
        text.contains("/usr/local/bin/memshadowd"),
        "control: a missing ExecStart binary must be reported:\n{text}"
    );
}

/// Capability numbers of the names the unit may use.
fn cap_bit(name: &str) -> u32 {
    match name {
        "CAP_DAC_OVERRIDE" => 1,
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        other => panic!("add {other} to cap_bit"),
    }
}

/// The unit's `CapabilityBoundingSet=` is what the daemon needs, no less (and the kept
/// capability does what the unit's comment says): the daemon runs as root limited to it and
/// serves a client of another uid through the mem fd that client handed over, and sees its
/// fork; with no capability at all it still serves the client, but gets no fork events (the
/// child just is not mirrored).
#[test]
fn unit_capabilities_are_what_the_daemon_uses() {
    if !needs_root("runs the daemon as root with the unit's capabilities, a client as nobody") {
        return;
    }
    let Some(setpriv) = tool("setpriv", "util-linux") else {
        return;
    };
    let caps = unit_values(&unit("memshadowd.service"), "CapabilityBoundingSet");
    assert_eq!(caps, ["CAP_SYS_PTRACE"]);
    let run = |caps: &[&str]| -> (String, String) {
        let bounding = std::iter::once("-all".to_owned())
            .chain(
                caps.iter()
                    .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase())),
            )
            .collect::<Vec<_>>()
            .join(",");
        let d = service_daemon()
            .wrapper([
                setpriv.as_os_str(),
                "--bounding-set".as_ref(),
                bounding.as_ref(),
                "--inh-caps".as_ref(),
                "-all".as_ref(),
                "--no-new-privs".as_ref(),
            ])
            .start();
        let st = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let eff = st
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        let want = caps.iter().map(|c| 1u64 << cap_bit(c)).sum::<u64>();
        assert_eq!(eff, want, "the daemon runs with exactly {caps:?}");
        let mut client = Command::new(&setpriv);
        client
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(binary("test-client"))
            .arg(d.socket());
        let mut c = TestClient::start_command(client);
        let answer = fields(&c.expect_ok("access"));
        let access = answer["access"].clone();
        // The features the daemon enabled: EVENT_FORK (1 << 1) only with CAP_SYS_PTRACE.
        let features =
            u64::from_str_radix(answer["features"].trim_start_matches("0x"), 16).unwrap();
        let fork_enabled = features & (1 << 1) != 0;
        c.expect_ok("map a 4");
        c.expect_ok("fill a 9");
        c.expect_ok("attach a");
        assert_eq!(fields(&c.expect_ok("read a 0 16384"))["uniform"], "9");
        c.expect_ok("fork");
        c.expect_ok("munmap a");
        // munmap returns once the daemon has read the event; its counters follow right
        // after, so wait for them rather than race them.
        let stats = d.wait_until("the client's events.unmap to be 1", HANG_GUARD, || {
            let stats = fields(&c.expect_ok("stats"));
            if stats["events.unmap"] == "1" {
                Ok(stats)
            } else {
                Err(format!("{stats:?}"))
            }
        });
        assert_eq!(
            fork_enabled,
            stats["events.fork"] == "1",
            "features {features:#x} vs {stats:?}"
        );
        (access, stats["events.fork"].clone())
    };
    assert_eq!(run(&["CAP_SYS_PTRACE"]), ("mem-fd".into(), "1".into()));
    assert_eq!(
        run(&[]),
        ("mem-fd".into(), "0".into()),
        "without CAP_SYS_PTRACE no fork events"
    );
}

/// Every system call of a syscall-filter group, expanded by systemd-analyze.
fn expand_group(analyze: &Path, group: &str, out: &mut BTreeSet<String>) {
    let o = Command::new(analyze)
        .args(["syscall-filter", group])
        .output()
        .unwrap();
    assert!(o.status.success(), "systemd-analyze syscall-filter {group}");
    for l in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
        let w = l.trim();
        if w.is_empty() || w.starts_with('#') {
            continue;
        }
        if w.starts_with('@') {
            expand_group(analyze, w, out);
        } else {
            out.insert(w.to_owned());
        }
    }
}

/// The daemon's system calls, seen by strace over a run that binds clients, mirrors, reads,
/// sees munmap/madvise/mremap events, pings the watchdog, reloads and
/// stops, all fit the unit's `SystemCallFilter=`; its sockets are `AF_UNIX` only
/// (`RestrictAddressFamilies=`); it locks no memory (no `LimitMEMLOCK=` needed) and never
/// maps memory writable and executable or makes it executable (`MemoryDenyWriteExecute=`).
#[test]
fn daemon_system_calls_fit_the_unit_filter() {
    let (Some(strace), Some(analyze)) =
        (tool("strace", "strace"), tool("systemd-analyze", "systemd"))
    else {
        return;
    };
    let filter = unit_values(&unit("memshadowd.service"), "SystemCallFilter");
    let mut allowed = BTreeSet::new();
    for w in &filter {
        assert!(!w.starts_with('~'), "this check handles allow-lists only");
        if w.starts_with('@') {
            expand_group(&analyze, w, &mut allowed);
        } else {
            allowed.insert(w.clone());
        }
    }
    assert!(allowed.len() > 100, "{allowed:?}");
    let families = unit_values(&unit("memshadowd.service"), "RestrictAddressFamilies");
    assert_eq!(families, ["AF_UNIX"]);

    let b = service_daemon();
    let mut n = Notify::new(b.dir().path());
    let trace = b.dir().path().join("trace");
    let mut d = b
        .wrapper([
            strace.as_os_str(),
            "-f".as_ref(),
            "-qq".as_ref(),
            "-o".as_ref(),
            trace.as_os_str(),
        ])
        .args(["--log-level", "debug"])
        .env("NOTIFY_SOCKET", &n.path)
        .env("WATCHDOG_USEC", "200000")
        .spawn();
    let ready = n.wait_for(&d, 0, "READY=1", |l| l == "READY=1");
    let daemon = *children(d.pid())
        .first()
        .unwrap_or_else(|| d.fail("strace has no child"));
    let mut c = TestClient::start(d.socket());
    assert_eq!(fields(&c.expect_ok("access"))["access"], "mem-fd");
    for kind in ["munmap", "dontneed", "remove", "mremap"] {
        c.expect_ok(&format!("g1 {kind} 3"));
    }
    c.expect_ok("map a 8");
    c.expect_ok("fill a 1");
    c.expect_ok("attach a");
    c.expect_ok("populate a");
    c.expect_ok("read a 0 32768");
    c.expect_ok("stats");
    let ctl = memshadow::Client::connect_control(Some(d.socket())).unwrap();
    ctl.status().unwrap();
    ctl.list_clients().unwrap();
    wait_until("two watchdog pings", HANG_GUARD, || {
        n.recv_one();
        n.count_all("WATCHDOG=1") >= 2
    });
    kill(Pid::from_raw(daemon), Signal::SIGHUP).unwrap();
    let rl = n.wait_for(&d, ready + 1, "RELOADING=1", |l| l == "RELOADING=1");
    n.wait_for(&d, rl + 1, "READY=1", |l| l == "READY=1");
    drop((c, ctl));
    kill(Pid::from_raw(daemon), Signal::SIGTERM).unwrap();
    assert!(d.wait().success(), "{}", d.log_tail(40));

    let text = std::fs::read_to_string(&trace).unwrap();
    let mut seen = BTreeSet::new();
    for line in text.lines() {
        let rest = line
            .split_once(' ')
            .map_or("", |(_, r)| r.trim_start())
            .trim_start_matches("<... ");
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let follows = rest[name.len()..].chars().next();
        if !name.is_empty() && matches!(follows, Some('(') | Some(' ')) {
            seen.insert(name.clone());
        }
        if rest.starts_with("socket(") {
            assert!(rest.starts_with("socket(AF_UNIX"), "{line}");
        }
        if rest.starts_with("mprotect(") || rest.starts_with("pkey_mprotect(") {
            assert!(!rest.contains("PROT_EXEC"), "{line}");
        }
        if rest.starts_with("mmap(") {
            assert!(
                !(rest.contains("PROT_WRITE") && rest.contains("PROT_EXEC")),
                "{line}"
            );
        }
    }
    assert!(seen.contains("epoll_wait") || seen.contains("epoll_pwait"));
    assert!(
        seen.contains("ioctl") && seen.contains("accept4"),
        "{seen:?}"
    );
    assert!(!seen.contains("process_vm_readv"), "{seen:?}");
    for lock in ["mlock", "mlock2", "mlockall"] {
        assert!(!seen.contains(lock), "the daemon calls {lock}");
    }
    let outside: Vec<_> = seen.difference(&allowed).collect();
    assert!(
        outside.is_empty(),
        "system calls outside the unit's SystemCallFilter: {outside:?}"
    );
}
