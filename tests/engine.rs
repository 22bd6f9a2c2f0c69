//! External engines in processes of their own (docs/engines.md): they read a client's
//! mirrored memory from shared memory and acknowledge flushes themselves.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use memshadow::{Engine, Error};
use memshadow_tests::{fields, Daemon, TestClient};
use nix::sys::signal::Signal;

const P: u64 = 4096;

/// A client with map `m` of `pages` pages filled with `byte`, attached and granted.
fn client_with_grant(d: &Daemon, pages: u64, byte: u8, args: &[&str]) -> (TestClient, u128) {
    let mut c = TestClient::start_with(d.socket(), args);
    c.expect_ok(&format!("map m {pages}"));
    c.expect_ok(&format!("fill m {byte}"));
    c.expect_ok("attach m");
    let token = grant(&mut c, "m");
    (c, token)
}

fn grant(c: &mut TestClient, map: &str) -> u128 {
    let f = fields(&c.expect_ok(&format!("grant {map}")));
    u128::from_str_radix(&f["token"], 16).unwrap()
}

/// An engine in a process of its own.
fn engine_process(d: &Daemon, token: u128, args: &[&str]) -> TestClient {
    let t = format!("{token:x}");
    let mut a = vec!["--engine", t.as_str()];
    a.extend_from_slice(args);
    TestClient::start_with(d.socket(), &a)
}

fn uniform(answer: &str) -> u8 {
    fields(answer)["uniform"].parse().unwrap()
}

#[test]
fn an_engine_in_another_process_reads_what_the_client_mirrored() {
    let d = Daemon::start(&[]);
    let (_c, token) = client_with_grant(&d, 16, 7, &[]);
    let mut e = engine_process(&d, token, &[]);
    assert_eq!(uniform(&e.expect_ok(&format!("read 0 {}", 16 * P))), 7);
    // Read again: every page is in the engine's TLB now, nothing faults.
    let before = fields(&e.expect_ok("stats"));
    assert_eq!(uniform(&e.expect_ok(&format!("read 100 {}", 4 * P))), 7);
    let after = fields(&e.expect_ok("stats"));
    assert_eq!(
        before["faults"], after["faults"],
        "a second read faults nothing"
    );
    assert!(after["tlb_hits"].parse::<u64>().unwrap() >= 4, "{after:?}");
}

#[test]
fn an_engine_in_this_process_reads_at_memory_speed_without_a_round_trip() {
    let d = Daemon::start(&[]);
    let (_c, token) = client_with_grant(&d, 4, 9, &[]);
    let mut e = Engine::attach(Some(d.socket()), token).unwrap();
    let mut buf = [0u8; 64];
    e.read(0, &mut buf).unwrap();
    assert_eq!(buf, [9; 64]);
    let faults = e.stats().faults;
    for _ in 0..10_000 {
        e.read(128, &mut buf).unwrap();
    }
    assert_eq!(e.stats().faults, faults, "hits make no request");
}

/// The byte the test client's `stamp` writes in page `page` in round `k`.
fn stamp_byte(page: u64, k: u64) -> u8 {
    (page * 32 + 1 + k % 31) as u8
}

/// One G1 round of `kind` with an engine in this process and the client in another: the
/// engine reads the client's per-page stamps, the client changes the mapping and says so,
/// the engine reads at once. Returns what that read gave, if it broke G1.
fn g1_round(d: &Daemon, c: &mut TestClient, kind: &str, round: u64) -> Option<String> {
    let name = format!("r{round}");
    c.expect_ok(&format!("map {name} 4"));
    c.expect_ok(&format!("stamp {name} {round}"));
    c.expect_ok(&format!("attach {name}"));
    let mut e = Engine::attach(Some(d.socket()), grant(c, &name)).unwrap();
    let mut buf = vec![0u8; (4 * P) as usize];
    e.read(0, &mut buf).unwrap();
    for (i, page) in buf.chunks(P as usize).enumerate() {
        assert!(
            page.iter().all(|b| *b == stamp_byte(i as u64, round)),
            "first read"
        );
    }
    // The client's call has returned once its answer is here: any read from now on is
    // issued after it (the causality the epoch relies on).
    match kind {
        "munmap" => c.expect_ok(&format!("munmap {name}")),
        "dontneed" => c.expect_ok(&format!("madvise {name} dontneed")),
        "mremap" => {
            // The mirror follows its mapping (same id), so its pages are now those at the new
            // place: write new stamps there; a read must never show the old ones.
            c.expect_ok(&format!("remap {name}"));
            c.expect_ok(&format!("stamp {name} {}", round + 7))
        }
        k => panic!("kind {k}"),
    };
    let page = 1 + round % 3;
    let mut after = vec![0u8; 64];
    let got = e.read(page * P, &mut after);
    if kind != "munmap" {
        c.expect_ok(&format!("munmap {name}"));
    }
    let old = stamp_byte(page, round);
    let moved = stamp_byte(page, round + 7);
    match (kind, got) {
        // The range is gone (munmap), or the engine's mirror moved away: no bytes at all.
        ("munmap" | "mremap", Err(Error::NotMirrored(_) | Error::Evicted(_))) => None,
        ("dontneed", Ok(())) if after.iter().all(|b| *b == 0) => None,
        // Read through the mirror that followed the mapping: the bytes there now.
        ("mremap", Ok(())) if after.iter().all(|b| *b == moved) => None,
        (_, got) => Some(format!(
            "{kind} round {round}: {got:?} {:?} (old stamp {old})",
            &after[..8]
        )),
    }
}

/// G1 for an engine outside the daemon: a read issued after the client's `munmap`,
/// `madvise(DONTNEED)` or `mremap` returned never sees the old bytes, even with the
/// daemon's start passes held back 2 ms after it read the events (the window the event-read
/// epoch closes: without it, nearly every round reads the old stamp).
#[test]
fn g1_engine_reads_after_munmap_madvise_and_mremap_never_see_old_bytes() {
    // Unmapped mirrors count against the quota until detached, and the client forgets them.
    let d = Daemon::builder()
        .env("MEMSHADOW_TEST_EVENT_DELAY_US", "2000")
        .args(["--quota-mirrors", "4096"])
        .start();
    let mut c = TestClient::start(d.socket());
    let mut bad = Vec::new();
    for round in 0..900 {
        let kind = ["dontneed", "munmap", "mremap"][round as usize % 3];
        bad.extend(g1_round(&d, &mut c, kind, round));
    }
    assert!(
        bad.is_empty(),
        "{} stale reads: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

/// What the daemon's engine list says of engine `id` (empty if it is not listed).
fn engine_state(d: &Daemon, id: &str) -> HashMap<String, String> {
    let ctl = memshadow::Client::connect_control(Some(d.socket())).unwrap();
    let list = ctl.engines(memshadow::Target::All).unwrap();
    let e = list
        .iter()
        .find(|e| e.id.to_string() == id && e.state != "built-in");
    let mut m = HashMap::new();
    if let Some(e) = e {
        m.insert("state".to_owned(), e.state.clone());
        m.insert("overflows".to_owned(), e.overflows.to_string());
        m.insert("depth".to_owned(), e.depth.to_string());
    }
    m
}

fn kill(pid: i32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

/// G2 with an engine that does not acknowledge: the slots it may read stay allocated
/// (not reused) until it is evicted after `engine_ack_timeout_ms`; the client is not held
/// up meanwhile, and the engine's calls then fail with `Evicted`.
#[test]
fn g2_slots_wait_for_a_stopped_engine_until_it_is_evicted() {
    let d = Daemon::start(&["--engine-ack-timeout-ms", "1500"]);
    let (mut c, token) = client_with_grant(&d, 64, 3, &[]);
    let mut e = engine_process(&d, token, &[]);
    let id = fields(&e.expect_ok("ping"))["engine"].clone();
    assert_eq!(uniform(&e.expect_ok(&format!("read 0 {}", 64 * P))), 3);
    let used = d.counter("shadow.slots_in_use");
    assert!(used >= 64, "{used}");
    memshadow_tests::stop_process(e.pid());
    let t = Instant::now();
    c.expect_ok("madvise m dontneed");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "the client waits for nobody"
    );
    // The start pass zapped the pages; their slots may not be reused before the engine
    // acknowledged or was evicted.
    let mut seen_held = false;
    while d.counter("device.engine_evictions") == 0 {
        if d.counter("shadow.slots_in_use") >= 64 {
            seen_held = true;
        } else {
            panic!("slots freed before the engine acknowledged or was evicted");
        }
        assert!(t.elapsed() < Duration::from_secs(60), "never evicted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen_held);
    d.wait_until("the slots to be freed", Duration::from_secs(30), || {
        d.counter("shadow.slots_in_use") < 64
    });
    assert_eq!(engine_state(&d, &id)["state"], "evicted");
    kill(e.pid(), Signal::SIGCONT);
    let a = e.cmd("read 0 64");
    assert!(a.contains("evicted"), "{a}");
    // The client goes on.
    c.expect_ok("fill m 5");
    c.expect_ok("sync m");
}

/// An engine SIGKILLed while a finish waits for it counts as having acknowledged
/// everything: the finish ends long before the (long) timeout.
#[test]
fn a_killed_engine_releases_the_finish_waiting_for_it() {
    let d = Daemon::start(&["--engine-ack-timeout-ms", "60000"]);
    let (mut c, token) = client_with_grant(&d, 16, 4, &[]);
    let mut e = engine_process(&d, token, &[]);
    assert_eq!(uniform(&e.expect_ok(&format!("read 0 {}", 16 * P))), 4);
    memshadow_tests::stop_process(e.pid());
    c.expect_ok("madvise m dontneed");
    // The finish waits (slots held) …
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.counter("shadow.slots_in_use") >= 16);
    let t = Instant::now();
    e.kill();
    d.wait_until("the slots to be freed", Duration::from_secs(30), || {
        d.counter("shadow.slots_in_use") < 16
    });
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?} after the kill",
        t.elapsed()
    );
    assert_eq!(d.counter("device.engine_evictions"), 0);
}

/// A ring the engine does not drain fills up; the daemon then queues one "flush all"
/// instead of waiting, and the engine, once it runs again, drops everything and reads the
/// current bytes.
#[test]
fn a_full_ring_becomes_one_flush_all() {
    let d = Daemon::start(&["--engine-ack-timeout-ms", "60000"]);
    let (mut c, token) = client_with_grant(&d, 400, 6, &[]);
    let mut e = engine_process(&d, token, &[]);
    let id = fields(&e.expect_ok("ping"))["engine"].clone();
    assert_eq!(uniform(&e.expect_ok(&format!("read 0 {}", 400 * P))), 6);
    memshadow_tests::stop_process(e.pid());
    for page in 0..300 {
        c.expect_ok(&format!("madvise-range m {} {P}", page * P));
    }
    d.wait_until("the ring to overflow", Duration::from_secs(30), || {
        engine_state(&d, &id)
            .get("overflows")
            .is_some_and(|o| o != "0")
    });
    kill(e.pid(), Signal::SIGCONT);
    e.expect_ok("poll");
    assert_eq!(uniform(&e.expect_ok(&format!("read 0 {}", 300 * P))), 0);
    assert_eq!(
        uniform(&e.expect_ok(&format!("read {} {}", 300 * P, 100 * P))),
        6
    );
    d.wait_until("the ring to drain", Duration::from_secs(30), || {
        engine_state(&d, &id).get("depth").is_some_and(|x| x == "0")
    });
}

/// A device write of one engine reaches the client's memory and every other engine.
#[test]
fn device_writes_are_seen_by_the_client_and_other_engines() {
    let d = Daemon::start(&[]);
    let (mut c, token) = client_with_grant(&d, 8, 1, &["--device-writes"]);
    let mut a = engine_process(&d, token, &[]);
    let mut b = engine_process(&d, token, &[]);
    assert_eq!(uniform(&b.expect_ok(&format!("read 0 {}", 8 * P))), 1);
    assert_eq!(
        fields(&a.expect_ok(&format!("write {} 100 42", 2 * P + 10)))["written"],
        "100"
    );
    assert_eq!(
        fields(&c.expect_ok(&format!("byte m {}", 2 * P + 10)))["byte"],
        "42"
    );
    assert_eq!(
        fields(&c.expect_ok(&format!("byte m {}", 2 * P + 109)))["byte"],
        "42"
    );
    assert_eq!(
        fields(&c.expect_ok(&format!("byte m {}", 2 * P + 110)))["byte"],
        "1"
    );
    assert_eq!(
        uniform(&b.expect_ok(&format!("read {} 100", 2 * P + 10))),
        42
    );
    assert_eq!(uniform(&b.expect_ok(&format!("read {} 10", 2 * P))), 1);
}

/// Without the client's consent (a writable `/proc/self/mem`), device writes are refused.
#[test]
fn device_writes_need_the_clients_consent() {
    let d = Daemon::start(&[]);
    let (mut c, token) = client_with_grant(&d, 2, 1, &[]);
    let mut e = Engine::attach(Some(d.socket()), token).unwrap();
    let err = e.write(0, &[9; 16]).unwrap_err();
    assert!(err.to_string().contains("not writable"), "{err}");
    assert_eq!(fields(&c.expect_ok("byte m 0"))["byte"], "1");
}

/// Grants: a wrong token, a revoked one (its mirror detached) and a token after the
/// client's exit are refused with `NoSuchGrant`.
#[test]
fn wrong_and_revoked_grants_are_refused() {
    let d = Daemon::start(&[]);
    let (mut c, token) = client_with_grant(&d, 2, 1, &[]);
    let wrong = Engine::attach(Some(d.socket()), token ^ 1).unwrap_err();
    assert!(matches!(wrong, Error::NoSuchGrant(_)), "{wrong:?}");
    let mut e = Engine::attach(Some(d.socket()), token).unwrap();
    c.expect_ok("detach m");
    let revoked = Engine::attach(Some(d.socket()), token).unwrap_err();
    assert!(matches!(revoked, Error::NoSuchGrant(_)), "{revoked:?}");
    // The engine attached before the detach lost its mirror.
    let mut buf = [0u8; 8];
    let gone = e.read(0, &mut buf).unwrap_err();
    assert!(matches!(gone, Error::Evicted(_)), "{gone:?}");
    c.expect_ok("attach m");
    let t2 = grant(&mut c, "m");
    c.kill();
    d.wait_until("the client to be released", Duration::from_secs(30), || {
        matches!(
            Engine::attach(Some(d.socket()), t2),
            Err(Error::NoSuchGrant(_))
        )
    });
}

/// Another user may not use a grant, nor attach by pid.
#[test]
fn another_users_engine_is_refused() {
    let d = Daemon::start(&[]);
    let (c, token) = client_with_grant(&d, 2, 1, &[]);
    let t = format!("{token:x}");
    let out = std::process::Command::new(memshadow_tests::binary("test-client"))
        .args([d.socket().as_os_str(), "--uid".as_ref(), "65534".as_ref()])
        .args(["--engine", t.as_str()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no such grant"), "{text}");
    let by_pid = format!("pid:{}:1", c.pid());
    let out = std::process::Command::new(memshadow_tests::binary("test-client"))
        .args([d.socket().as_os_str(), "--uid".as_ref(), "65534".as_ref()])
        .args(["--engine", by_pid.as_str()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("root or the daemon's owner"), "{text}");
}

/// A client's engine that does not acknowledge holds up that client's finishes only: the
/// finishes of another user's client end at once.
#[test]
fn a_stopped_engine_holds_up_nobody_else() {
    let d = Daemon::start(&["--engine-ack-timeout-ms", "60000"]);
    let (mut a, token) = client_with_grant(&d, 16, 4, &[]);
    let mut e = engine_process(&d, token, &[]);
    assert_eq!(uniform(&e.expect_ok(&format!("read 0 {}", 16 * P))), 4);
    memshadow_tests::stop_process(e.pid());
    a.expect_ok("madvise m dontneed");
    let mut b = TestClient::start_with(d.socket(), &["--uid", "65534"]);
    b.expect_ok("map n 16");
    b.expect_ok("fill n 8");
    b.expect_ok("attach n");
    // Read through the built-in engines, so the finish of an invalidation has their flushes
    // to wait for (and runs at all).
    assert_eq!(uniform(&b.expect_ok(&format!("read n 0 {}", 15 * P))), 8);
    let shadow = |b: &mut TestClient| -> u64 {
        fields(&b.expect_ok("stats"))["client.shadow_bytes"]
            .parse()
            .unwrap()
    };
    assert_eq!(shadow(&mut b), 15 * P);
    let t = Instant::now();
    b.expect_ok("madvise n dontneed");
    while shadow(&mut b) != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "another client's finish waited for a stopped engine it has nothing to do with"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    e.kill();
}

/// A client has at most 32 external engines; one more is refused, not queued.
#[test]
fn a_client_has_a_bounded_number_of_engines() {
    let d = Daemon::start(&[]);
    let (_c, token) = client_with_grant(&d, 2, 1, &[]);
    let engines: Vec<Engine> = (0..32)
        .map(|_| Engine::attach(Some(d.socket()), token).unwrap())
        .collect();
    let more = Engine::attach(Some(d.socket()), token).unwrap_err();
    assert!(
        more.to_string().contains("too many external engines"),
        "{more}"
    );
    drop(engines);
    // Their sessions' ends make room again.
    d.wait_until("room for an engine", Duration::from_secs(30), || {
        Engine::attach(Some(d.socket()), token).is_ok()
    });
}

/// G2 with an engine that acknowledges 10 ms after its doorbell rings, reading in its own
/// process while the client keeps invalidating and rewriting: no read ever shows another
/// page's bytes (a reused slot), and the finishes did wait for its acknowledgements.
#[test]
fn g2_a_slow_engine_never_reads_a_reused_slot_and_reuse_waits_for_it() {
    let d = Daemon::start(&[]);
    let mut c = TestClient::start(d.socket());
    c.expect_ok("map m 8");
    c.expect_ok("stamp m 0");
    c.expect_ok("attach m");
    let token = grant(&mut c, "m");
    let mut e = engine_process(&d, token, &["--ack-delay-ms", "10"]);
    let id = fields(&e.expect_ok("ping"))["engine"].clone();
    let mut reader = engine_process(&d, token, &[]);
    // The slow engine caches every page, then both churn: the client zaps and rewrites,
    // the fast engine re-faults (so slots are reused), the slow one reads.
    e.expect_ok("verify 8 1");
    let mut foreign = 0;
    for k in 1..=40 {
        c.expect_ok("madvise m dontneed");
        c.expect_ok(&format!("stamp m {k}"));
        reader.expect_ok("verify 8 1");
        let v = fields(&e.expect_ok("verify 8 2"));
        foreign += v["foreign"].parse::<u64>().unwrap();
    }
    assert_eq!(foreign, 0, "reads of reused slots");
    assert_eq!(d.counter("device.g2_violations"), 0);
    let ctl = memshadow::Client::connect_control(Some(d.socket())).unwrap();
    let list = ctl.engines(memshadow::Target::All).unwrap();
    let slow = list
        .iter()
        .find(|x| x.id.to_string() == id && x.state != "built-in")
        .unwrap();
    assert!(slow.acks >= 1, "{slow:?}");
    assert!(
        slow.ack_p50_us >= 9_000,
        "finishes did not wait for the slow engine: {slow:?}"
    );
    assert_eq!(slow.state, "attached", "{slow:?}");
}

/// An engine that faults while the client keeps discarding its pages: a fault may wait for
/// an invalidation whose finish waits for this very engine, so the engine acknowledges
/// flushes while its fault is served, and is never evicted for it.
#[test]
fn an_engine_faulting_under_churn_is_not_evicted() {
    let d = Daemon::start(&["--engine-ack-timeout-ms", "5000"]);
    let (mut c, token) = client_with_grant(&d, 64, 2, &[]);
    let mut e = engine_process(&d, token, &[]);
    let id = fields(&e.expect_ok("ping"))["engine"].clone();
    c.expect_ok("churn-start m");
    let v = fields(&e.expect_ok("verify 64 20"));
    c.expect_ok("churn-stop");
    assert_eq!(
        v["reads"],
        (64 * 20).to_string(),
        "every read succeeded: {v:?}"
    );
    assert_eq!(d.counter("device.engine_evictions"), 0);
    assert_eq!(engine_state(&d, &id)["state"], "attached");
}

/// The same while the client's writes are collected (`sync`): those invalidations are not
/// fenced, so the engine's faults wait for them to end, and their finishes wait for the
/// engine, which must acknowledge while its fault is served.
#[test]
fn an_engine_faulting_while_writes_are_collected_is_not_evicted() {
    let d = Daemon::start(&["--engine-ack-timeout-ms", "5000"]);
    let (mut c, token) = client_with_grant(&d, 64, 2, &[]);
    let mut e = engine_process(&d, token, &[]);
    let id = fields(&e.expect_ok("ping"))["engine"].clone();
    let reader = std::thread::spawn(move || {
        let v = fields(&e.expect_ok("verify 64 30"));
        (e, v)
    });
    for k in 0..300u64 {
        c.expect_ok(&format!(
            "write m {} {} {}",
            (k % 62) * P,
            2 * P,
            k % 200 + 1
        ));
        c.expect_ok("sync m");
    }
    let (_e, v) = reader.join().unwrap();
    assert_eq!(
        v["reads"],
        (64 * 30).to_string(),
        "every read succeeded: {v:?}"
    );
    assert_eq!(d.counter("device.engine_evictions"), 0);
    assert_eq!(engine_state(&d, &id)["state"], "attached");
}

/// `memshadowctl trace` shows each wait of a finish for an external engine: the engine, how
/// long the finish waited and how it ended — acknowledged by a slow engine, then, once the
/// engine is stopped, evicted after the whole `engine_ack_timeout`.
#[test]
fn trace_shows_each_engines_acknowledgement_and_eviction() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let d = Daemon::start(&["--engine-ack-timeout-ms", "1500"]);
    let (mut c, token) = client_with_grant(&d, 8, 6, &[]);
    let mut e = engine_process(&d, token, &["--ack-delay-ms", "10"]);
    let id: u32 = fields(&e.expect_ok("ping"))["engine"].parse().unwrap();
    let pid = c.pid().to_string();
    let mut trace = Command::new(memshadow_tests::binary("memshadowctl"))
        .arg("--socket")
        .arg(d.socket())
        .args(["--json", "trace", "--pid", &pid, "--event", "engine-ack"])
        .args(["--count", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_until("a trace listener", memshadow_tests::HANG_GUARD, || {
        d.counter("trace.listeners") == 1
    });
    assert_eq!(uniform(&e.expect_ok(&format!("read 0 {}", 8 * P))), 6);
    c.expect_ok("madvise m dontneed");
    // A read of a fenced range is served over the session and installs nothing, which would
    // leave the engine nothing to flush the second time.
    d.wait_fences_lifted();
    assert_eq!(uniform(&e.expect_ok(&format!("read 0 {}", 8 * P))), 0);
    memshadow_tests::stop_process(e.pid());
    c.expect_ok("madvise m dontneed");
    // Read on a thread of its own, so a record that never comes fails the test, not hangs it.
    let out = BufReader::new(trace.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut lines = Vec::new();
    for _ in 0..2 {
        match rx.recv_timeout(memshadow_tests::HANG_GUARD) {
            Ok(l) => lines.push(serde_json::from_str::<serde_json::Value>(&l).unwrap()),
            Err(_) => {
                let _ = trace.kill();
                panic!("no acknowledgement record after {lines:?}");
            }
        }
    }
    assert!(trace.wait().unwrap().success());
    for l in &lines {
        assert_eq!(l["event"].as_str(), Some("engine-ack"), "{l}");
        assert_eq!(l["pid"].as_i64(), Some(c.pid().into()), "{l}");
        assert_eq!(l["engine_id"].as_u64(), Some(id.into()), "{l}");
        assert_eq!(l["engine_pid"].as_i64(), Some(e.pid().into()), "{l}");
    }
    assert_eq!(lines[0]["outcome"].as_str(), Some("acknowledged"));
    assert!(lines[0]["wait_ns"].as_u64().unwrap() > 0);
    assert_eq!(lines[1]["outcome"].as_str(), Some("evicted"));
    assert!(
        lines[1]["wait_ns"].as_u64().unwrap() >= 1_500_000_000,
        "an eviction waits the whole timeout: {}",
        lines[1]
    );
    assert!(lines[1]["seq"].as_u64() > lines[0]["seq"].as_u64());
    kill(e.pid(), Signal::SIGCONT);
}
