//! External engines in processes of their own (docs/engines.md): they read a client's
//! mirrored memory from shared memory and acknowledge flushes themselves.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use memshadow::{Engine, Error};
use memshadow_tests::{fields, Daemon, TestClient};

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
