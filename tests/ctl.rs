//! `memshadowctl` against a real daemon and real clients: every subcommand, `--json` parsed
//! back, the documented exit codes, and the G7 refusals for a user who is neither root nor
//! the daemon's owner (run as `nobody`).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use memshadow_tests::{binary, fields, needs_root, tool, Daemon, TestClient, HANG_GUARD};
use serde_json::Value;

const P: u64 = 4096;

fn ctl_cmd(d: &Daemon, args: &[&str]) -> Command {
    let mut c = Command::new(binary("memshadowctl"));
    c.arg("--socket").arg(d.socket()).args(args);
    c
}

fn ctl(d: &Daemon, args: &[&str]) -> Output {
    ctl_cmd(d, args).output().expect("run memshadowctl")
}

/// Runs memshadowctl, requires exit 0 and returns stdout.
fn ok(d: &Daemon, args: &[&str]) -> String {
    let o = ctl(d, args);
    assert!(
        o.status.success(),
        "memshadowctl {args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn json(d: &Daemon, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(d, &a)).unwrap()
}

/// A client with one attached map `a` of `pages` pages, filled with `byte` and read once
/// through the device.
fn client_with_map(d: &Daemon, pages: u64, byte: u8) -> (TestClient, u64) {
    let mut c = TestClient::start(d.socket());
    let addr = fields(&c.expect_ok(&format!("map a {pages}")))["addr"].clone();
    let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16).unwrap();
    c.expect_ok(&format!("fill a {byte}"));
    c.expect_ok("attach a");
    // A device read of every page: faults them in and leaves them in the engines' TLBs.
    assert_eq!(
        c.expect_ok(&format!("read a 0 {}", pages * P)),
        format!("uniform={byte}")
    );
    (c, addr)
}

#[test]
fn status_and_stats_in_text_and_json() {
    let d = Daemon::start(&["--engines", "3"]);
    let text = ok(&d, &["status"]);
    assert!(text.contains("memshadowd 0.1.0"), "{text}");
    assert!(text.contains(&d.socket().display().to_string()), "{text}");
    assert!(text.contains("3 engines"), "{text}");
    let v = json(&d, &["status"]);
    assert_eq!(
        v["info"]["socket"].as_str(),
        Some(d.socket().to_str().unwrap())
    );
    assert_eq!(v["info"]["device.engines"].as_str(), Some("3"));
    assert_eq!(v["info"]["device.mode"].as_str(), Some("two-pass-batched"));
    assert!(v["counters"]["server.uptime_ms"].is_u64());

    let (_c, _) = client_with_map(&d, 4, 7);
    let stats = json(&d, &["stats"]);
    assert_eq!(stats["shadow.slots_in_use"].as_u64(), Some(4));
    assert!(stats["device.faults"].as_u64().unwrap() >= 1);
    let text = ok(&d, &["stats"]);
    let line = text
        .lines()
        .find(|l| l.starts_with("shadow.slots_in_use"))
        .unwrap();
    assert_eq!(line.split_whitespace().nth(1), Some("4"));
}

#[test]
fn clients_and_mirrors_show_every_client() {
    let d = Daemon::start(&[]);
    let (c, addr) = client_with_map(&d, 8, 1);
    let pid = c.pid();
    let clients = json(&d, &["clients"]);
    let me = clients
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["pid"].as_i64() == Some(pid.into()))
        .unwrap_or_else(|| panic!("client {pid} not listed: {clients}"));
    assert_eq!(me["comm"].as_str(), Some("test-client"));
    assert_eq!(me["ranges"].as_u64(), Some(1));
    assert_eq!(me["shadow_bytes"].as_u64(), Some(8 * P));
    assert!(me["faults"].as_u64().unwrap() >= 1);
    let text = ok(&d, &["clients"]);
    assert!(
        text.lines()
            .any(|l| l.contains("test-client") && l.contains(&pid.to_string())),
        "{text}"
    );

    let mirrors = json(&d, &["mirrors", "--pid", &pid.to_string()]);
    let m = &mirrors.as_array().unwrap()[..];
    assert_eq!(m.len(), 1, "{mirrors}");
    assert_eq!(m[0]["addr"].as_u64(), Some(addr));
    assert_eq!(m[0]["len"].as_u64(), Some(8 * P));
    assert_eq!(m[0]["pages"].as_u64(), Some(8));
    assert_eq!(m[0]["state"].as_str(), Some("active"));
    assert_eq!(
        m[0]["seq"].as_u64().unwrap() % 2,
        1,
        "notifier seqs are odd"
    );
    let text = ok(&d, &["mirrors"]);
    assert!(
        text.contains(&format!("{addr:#x}-{:#x}", addr + 8 * P)),
        "{text}"
    );
}

/// A client names its process with escape sequences (clear the screen, bell, a tab, a
/// newline that would start a fake row, an 8-bit CSI): `clients` shows the name escaped and
/// writes no control byte to the operator's terminal; JSON carries the exact name.
#[test]
fn clients_show_a_hostile_process_name_escaped() {
    let d = Daemon::start(&[]);
    let mut c = TestClient::start(d.socket());
    let name = "ev\x1b[2J\x07\t\n\u{9b}1m";
    assert!(name.len() <= 15, "PR_SET_NAME keeps 15 bytes");
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    c.expect_ok(&format!("setname {hex}"));
    let pid = c.pid().to_string();

    let o = ctl(&d, &["clients"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let raw: Vec<char> = text
        .chars()
        .filter(|&c| c != '\n' && c.is_control())
        .collect();
    assert!(raw.is_empty(), "raw control characters {raw:?} in {text:?}");
    let row = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(pid.as_str()))
        .unwrap_or_else(|| panic!("client {pid} not listed: {text}"));
    assert!(row.contains(r"ev\x1b[2J\x07\t\n\u{9b}1m"), "{row}");
    // No row was injected: every line after the header starts with a pid.
    for l in text.lines().skip(1) {
        let first = l.split_whitespace().next().unwrap_or("");
        assert!(first.parse::<i32>().is_ok(), "not a row: {l:?} in {text}");
    }

    let o = ctl(&d, &["--json", "clients"]);
    assert!(o.status.success());
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        !out.trim_end_matches('\n').chars().any(char::is_control),
        "{out:?}"
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let me = v
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["pid"].as_i64() == Some(c.pid().into()))
        .unwrap_or_else(|| panic!("client {pid} not listed: {v}"));
    assert_eq!(me["comm"].as_str(), Some(name));
}

#[test]
fn peek_reads_the_shadow_in_every_format() {
    let d = Daemon::start(&[]);
    let (c, addr) = client_with_map(&d, 2, 0x5a);
    let pid = c.pid().to_string();
    let a = format!("{:#x}", addr + P - 8);
    let raw = ctl(&d, &["peek", "--pid", &pid, &a, "16", "--raw"]);
    assert!(raw.status.success());
    assert_eq!(raw.stdout, vec![0x5a; 16]);
    let hex = ok(&d, &["peek", "--pid", &pid, &a, "16"]);
    assert!(
        hex.starts_with(&format!("{:016x}  5a 5a", addr + P - 8)),
        "{hex}"
    );
    assert!(hex.contains("|ZZZZZZZZZZZZZZZZ|"), "{hex}");
    let v = json(&d, &["peek", "--pid", &pid, &a, "16"]);
    assert_eq!(v["hex"].as_str(), Some("5a".repeat(16).as_str()));
    // Outside any mirror: a clear error, exit 1.
    let o = ctl(&d, &["peek", "--pid", &pid, "0x1000", "16"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("memshadowctl: not mirrored"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

/// A pid that is not a bound client, because it went away or never bound, is named as
/// such by every request about a client (`NoSuchClient`), never as a missing mirror or an
/// empty list; a trace of it does not wait for records that cannot come.
#[test]
fn a_gone_or_unbound_pid_is_no_such_client() {
    let d = Daemon::start(&[]);
    let (mut c, addr) = client_with_map(&d, 2, 1);
    let gone = c.pid().to_string();
    c.kill();
    let a = format!("{addr:#x}");
    // The daemon's own pid: a process, but no client.
    let unbound = d.pid().to_string();
    for pid in [&gone, &unbound] {
        for args in [
            vec!["peek", "--pid", pid, &a, "16"],
            vec!["mirrors", "--pid", pid],
            vec!["invalidate", "--pid", pid, &a, "4096"],
            vec!["sync", "--pid", pid],
            vec!["trace", "--pid", pid],
        ] {
            let mut child = ctl_cmd(&d, &args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // A trace of a gone pid must end, not wait for records that cannot come.
            d.wait_until(format!("memshadowctl {args:?} to exit"), HANG_GUARD, || {
                child.try_wait().unwrap().is_some()
            });
            let o = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
            assert_eq!(
                err.trim_end(),
                format!("memshadowctl: no such client: pid {pid} is not a bound client"),
                "{args:?}"
            );
        }
    }
}

#[test]
fn invalidate_reports_what_it_did_and_eagain() {
    let d = Daemon::start(&[]);
    let (mut c, addr) = client_with_map(&d, 4, 3);
    let pid = c.pid().to_string();
    let a = format!("{addr:#x}");
    let v = json(&d, &["invalidate", "--pid", &pid, &a, "8192"]);
    assert_eq!(v["notifiers"].as_u64(), Some(1), "{v}");
    assert_eq!(v["would_block"].as_bool(), Some(false));
    assert_eq!(v["event"].as_str(), Some("clear"));
    assert_eq!(v["end"].as_u64(), Some(addr + 2 * P));
    assert!(v["flushes_queued"].as_u64().unwrap() >= 1, "{v}");
    // The two invalidated pages left the shadow; the other two stayed.
    let m = json(&d, &["mirrors", "--pid", &pid]);
    assert_eq!(m[0]["pages"].as_u64(), Some(2), "{m}");
    // Non-blocking: a two-pass start only queues its flushes (the wait is in the finish), so
    // it goes through; a one-pass notifier would have to wait inside the walk, so it refuses.
    let nb = |d: &Daemon, pid: &str, at: u64| {
        ok(
            d,
            &[
                "invalidate",
                "--pid",
                pid,
                &format!("{at:#x}"),
                "4K",
                "--non-blocking",
                "--event",
                "soft-dirty",
            ],
        )
    };
    let text = nb(&d, &pid, addr + 2 * P);
    assert!(text.starts_with("invalidated: soft-dirty"), "{text}");
    assert!(text.contains("notifiers hit 1"), "{text}");
    let one = Daemon::start(&["--mode", "one-pass"]);
    let (_c1, addr1) = client_with_map(&one, 2, 4);
    let text = nb(&one, &_c1.pid().to_string(), addr1);
    assert!(text.starts_with("EAGAIN"), "{text}");
    let m = json(&one, &["mirrors"]);
    assert_eq!(
        m[0]["pages"].as_u64(),
        Some(2),
        "refused: nothing unmapped: {m}"
    );
    // Re-faulted on the next device read, with the client's current bytes.
    assert_eq!(c.expect_ok("read a 0 16384"), "uniform=3");
    // Bad event names are usage errors.
    assert_eq!(
        ctl(&d, &["invalidate", "--pid", &pid, &a, "1", "--event", "x"])
            .status
            .code(),
        Some(2)
    );
}

/// Waits until the daemon counts `n` trace listeners.
fn wait_listeners(d: &Daemon, n: u64) {
    d.wait_until(format!("{n} trace listeners"), HANG_GUARD, || {
        d.counter("trace.listeners") == n
    });
}

#[test]
fn trace_streams_invalidations_with_filters() {
    let d = Daemon::start(&[]);
    let (mut c, addr) = client_with_map(&d, 4, 9);
    let pid = c.pid().to_string();
    let mut all = ctl_cmd(&d, &["--json", "trace", "--pid", &pid, "--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut unmaps = ctl_cmd(&d, &["trace", "--event", "unmap", "--count", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listeners(&d, 2);
    c.expect_ok("madvise a dontneed");
    c.expect_ok("munmap a");
    let lines: Vec<Value> = BufReader::new(all.stdout.take().unwrap())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert!(all.wait().unwrap().success());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["event"].as_str(), Some("clear"));
    assert_eq!(lines[1]["event"].as_str(), Some("unmap"));
    for l in &lines {
        assert_eq!(l["pid"].as_i64(), Some(c.pid().into()));
        assert_eq!(l["start"].as_u64(), Some(addr));
        assert_eq!(l["end"].as_u64(), Some(addr + 4 * P));
        assert_eq!(l["notifiers"].as_u64(), Some(1));
    }
    // The clear found 4 pages in the shadow, so it had a TLB flush to wait for.
    assert!(lines[0]["flushes_queued"].as_u64().unwrap() >= 1);
    let text: Vec<String> = BufReader::new(unmaps.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .collect();
    assert!(unmaps.wait().unwrap().success());
    assert_eq!(text.len(), 2, "header and one record: {text:?}");
    assert!(text[1].contains(" unmap "), "{text:?}");
    assert!(text[1].contains(&format!("{addr:#x}-")), "{text:?}");
}

#[test]
fn sync_collects_written_pages_of_a_client() {
    let d = Daemon::start(&["--dirty-tracking", "pagemap-scan"]);
    let (mut c, addr) = client_with_map(&d, 4, 5);
    let pid = c.pid().to_string();
    c.expect_ok("write a 8192 16 9");
    let a = format!("{:#x}", addr + 2 * P);
    // Not collected yet: the shadow still has the old bytes.
    assert_eq!(
        ctl(&d, &["peek", "--pid", &pid, &a, "16", "--raw"]).stdout,
        vec![5; 16]
    );
    let v = json(&d, &["sync", "--pid", &pid]);
    assert_eq!(v["backend"].as_str(), Some("pagemap-scan"), "{v}");
    assert_eq!(v["pages_dirty"].as_u64(), Some(1), "{v}");
    assert_eq!(v["pages_scanned"].as_u64(), Some(4), "{v}");
    assert_eq!(
        ctl(&d, &["peek", "--pid", &pid, &a, "16", "--raw"]).stdout,
        vec![9; 16]
    );
    let text = ok(&d, &["sync", "--pid", &pid]);
    assert!(text.contains("0 written"), "{text}");
}

#[test]
fn unreachable_daemon_and_usage_errors_have_their_exit_codes() {
    let dir = memshadow_tests::TempDir::new("ctl");
    let o = Command::new(binary("memshadowctl"))
        .arg("--socket")
        .arg(dir.path().join("none.sock"))
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot connect to memshadowd"), "{err}");
    let o = Command::new(binary("memshadowctl"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = Command::new(binary("memshadowctl"))
        .args(["peek", "--pid", "1", "0x1000", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// Runs memshadowctl as `nobody` (neither root nor the daemon's owner) with `runuser`.
/// `runuser` and a daemon whose socket `nobody` can reach (`None`, a skip recorded, without
/// root or `runuser`).
fn daemon_for_nobody() -> Option<(PathBuf, Daemon)> {
    if !needs_root("runs memshadowctl as nobody") {
        return None;
    }
    let runuser = tool("runuser", "util-linux")?;
    let d = Daemon::start(&[]);
    // The socket's directory must be reachable by nobody.
    std::fs::set_permissions(
        d.dir().path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    Some((runuser, d))
}

fn as_nobody(runuser: &Path, d: &Daemon, args: &[&str]) -> Output {
    let o = Command::new(runuser)
        .args(["-u", "nobody", "--"])
        .arg(binary("memshadowctl"))
        .arg("--socket")
        .arg(d.socket())
        .args(args)
        .output()
        .expect("run runuser");
    o
}

#[test]
fn other_clients_are_refused_to_an_unprivileged_user() {
    let Some((runuser, d)) = daemon_for_nobody() else {
        return;
    };
    let (c, addr) = client_with_map(&d, 2, 1);
    let pid = c.pid().to_string();
    let a = format!("{addr:#x}");
    // Anyone may ask for the daemon's status.
    let o = as_nobody(&runuser, &d, &["status"]);
    assert!(
        o.status.success(),
        "status as nobody: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for args in [
        vec!["clients"],
        vec!["mirrors"],
        vec!["mirrors", "--pid", &pid],
        vec!["peek", "--pid", &pid, &a, "16"],
        vec!["invalidate", "--pid", &pid, &a, "4096"],
        vec!["sync", "--pid", &pid],
        vec!["trace", "--pid", &pid],
        vec!["trace"],
    ] {
        let o = as_nobody(&runuser, &d, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(4), "{args:?} as nobody: {err}");
        assert!(err.contains("permission denied"), "{args:?}: {err}");
    }
    // Nothing was invalidated on nobody's behalf.
    assert_eq!(
        json(&d, &["mirrors", "--pid", &pid])[0]["pages"].as_u64(),
        Some(2)
    );
}

/// Mirror `a` of client `c` granted to an engine in a process of its own (`test-client
/// --engine TOKEN`), which has read it all once. Returns the engine and the mirror's id.
fn engine_of(d: &Daemon, c: &mut TestClient, pages: u64, byte: u8) -> (TestClient, u64) {
    let token = fields(&c.expect_ok("grant a"))["token"].clone();
    let mut e = TestClient::start_with(d.socket(), &["--engine", &token]);
    assert_eq!(
        e.expect_ok(&format!("read 0 {}", pages * P)),
        format!("uniform={byte}")
    );
    let m = json(d, &["mirrors", "--pid", &c.pid().to_string()]);
    let id = m[0]["id"].as_u64().unwrap_or_else(|| panic!("{m}"));
    (e, id)
}

/// The engine with id `id` in `memshadowctl --json engines [args]`.
fn listed_engine(d: &Daemon, args: &[&str], id: u64) -> Option<Value> {
    let mut a = vec!["engines"];
    a.extend_from_slice(args);
    let v = json(d, &a);
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .find(|x| x["id"].as_u64() == Some(id))
        .cloned()
}

#[test]
fn engines_lists_an_attached_engine_with_its_pids_and_mirror() {
    // A generous acknowledgement timeout: this engine acknowledges only when the test asks.
    let d = Daemon::start(&["--engine-ack-timeout-ms", "30000"]);
    let (other, _) = client_with_map(&d, 2, 2);
    let (mut c, _) = client_with_map(&d, 4, 7);
    let (mut e, mirror) = engine_of(&d, &mut c, 4, 7);
    let id: u64 = fields(&e.expect_ok("ping"))["engine"].parse().unwrap();
    let client_pid = c.pid().to_string();

    // An invalidation of pages the engine caches: a flush on its ring, acknowledged by its
    // next access (the read waits for the client's epoch, then handles the ring).
    c.expect_ok("madvise a dontneed");
    assert_eq!(e.expect_ok(&format!("read 0 {P}")), "uniform=0");
    d.wait_until("the flush acknowledged", HANG_GUARD, || {
        listed_engine(&d, &[], id)
            .is_some_and(|x| x["acks"].as_u64() >= Some(1) && x["depth"].as_u64() == Some(0))
    });

    let x = listed_engine(&d, &[], id).unwrap();
    assert_eq!(x["pid"].as_i64(), Some(e.pid().into()), "{x}");
    assert_eq!(x["client_pid"].as_i64(), Some(c.pid().into()), "{x}");
    assert_eq!(x["mirror_id"].as_u64(), Some(mirror), "{x}");
    assert_eq!(x["state"].as_str(), Some("attached"), "{x}");
    assert!(x["flushes"].as_u64().unwrap() >= 1, "{x}");
    assert!(
        x["faults"].as_u64().unwrap() >= 1,
        "it faulted pages in: {x}"
    );
    assert_eq!(x["writes"].as_u64(), Some(0), "{x}");
    assert_eq!(x["overflows"].as_u64(), Some(0), "{x}");
    assert!(x["ack_p99_us"].as_u64() >= x["ack_p50_us"].as_u64(), "{x}");
    // What the engine says its TLB holds (its own word, as of its last acknowledgement or
    // fault): at most the mirror's 4 pages.
    assert!(x["tlb_entries"].as_u64().unwrap() <= 4, "{x}");

    // --pid: this client's engines only; another client has none.
    let mine = json(&d, &["engines", "--pid", &client_pid]);
    assert_eq!(mine.as_array().map(Vec::len), Some(1), "{mine}");
    let theirs = json(&d, &["engines", "--pid", &other.pid().to_string()]);
    assert_eq!(theirs, Value::Array(vec![]), "{theirs}");

    // The table: a header and the engine's row.
    let text = ok(&d, &["engines"]);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    for col in [
        "ID", "PID", "CLIENT", "MIRROR", "DEPTH", "ACK P50", "ACK P99", "STATE",
    ] {
        assert!(header.contains(col), "{col} in {header}");
    }
    let row: Vec<&str> = lines
        .find(|l| l.split_whitespace().next() == Some(id.to_string().as_str()))
        .unwrap_or_else(|| panic!("engine {id} not listed: {text}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[1], e.pid().to_string(), "{text}");
    assert_eq!(row[2], client_pid, "{text}");
    assert_eq!(row[3], mirror.to_string(), "{text}");
    assert_eq!(row.last(), Some(&"attached"), "{text}");

    // The engine's process exits: it is no longer listed (or shown gone).
    e.kill();
    d.wait_until("the engine to leave the list", HANG_GUARD, || {
        listed_engine(&d, &[], id).is_none_or(|x| x["state"] == "gone")
    });
}

/// An engine that does not acknowledge within `device.engine_ack_timeout_ms` (here: a
/// stopped process) is evicted: `engines` says so, `stats` counts it, and the engine's next
/// access, once it runs again, is refused.
#[test]
fn engines_shows_an_engine_evicted_for_a_missed_acknowledgement() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let d = Daemon::start(&["--engine-ack-timeout-ms", "50"]);
    let (mut c, _) = client_with_map(&d, 4, 3);
    let (mut e, _) = engine_of(&d, &mut c, 4, 3);
    let id: u64 = fields(&e.expect_ok("ping"))["engine"].parse().unwrap();
    assert_eq!(
        json(&d, &["stats"])["device.engine_evictions"].as_u64(),
        Some(0)
    );
    kill(Pid::from_raw(e.pid()), Signal::SIGSTOP).unwrap();
    // A flush the stopped engine cannot acknowledge; the client's call is not held up.
    c.expect_ok("madvise a dontneed");
    d.wait_until("the engine to be evicted", HANG_GUARD, || {
        listed_engine(&d, &[], id).is_some_and(|x| x["state"] == "evicted")
    });
    assert_eq!(
        json(&d, &["stats"])["device.engine_evictions"].as_u64(),
        Some(1)
    );
    let text = ok(&d, &["engines"]);
    assert!(text.lines().any(|l| l.ends_with("  evicted")), "{text}");
    kill(Pid::from_raw(e.pid()), Signal::SIGCONT).unwrap();
    let a = e.cmd(&format!("read 0 {P}"));
    assert!(a.starts_with("err engine evicted"), "{a}");
}

#[test]
fn engines_are_refused_to_an_unprivileged_user() {
    let Some((runuser, d)) = daemon_for_nobody() else {
        return;
    };
    let (mut c, _) = client_with_map(&d, 2, 1);
    let (e, _) = engine_of(&d, &mut c, 2, 1);
    let pid = c.pid().to_string();
    for args in [
        vec!["engines"],
        vec!["--json", "engines"],
        vec!["engines", "--pid", &pid],
    ] {
        let o = as_nobody(&runuser, &d, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(4), "{args:?} as nobody: {err}");
        assert_eq!(
            err.trim_end(),
            "memshadowctl: permission denied: listing other clients' engines is for root or the \
             daemon's owner",
            "{args:?}"
        );
        assert!(o.stdout.is_empty(), "nothing listed: {args:?}");
    }
    // Root still sees it.
    let all = json(&d, &["engines"]);
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|x| x["pid"].as_i64() == Some(e.pid().into())),
        "{all}"
    );
}
