//! Unit tests of the C ABI: NULL arguments, the last error, panics, and every error kind's
//! code, through the `extern "C"` functions against a fake daemon on a socketpair.

#![allow(clippy::unwrap_used)]

use std::ptr::{null, null_mut};
use std::sync::mpsc;

use memshadow_proto::{
    AttachPolicy, ErrorCode, Limits, Request, Response, SocketError, MAX_READ, VERSION,
};

use super::*;
use Status::*;

/// The Rust library's fake daemon (a file of its unit tests, not of its API).
#[path = "../../src/fake_daemon.rs"]
mod fake_daemon;

fn last_errno() -> c_int {
    memshadow_last_errno()
}

fn last_error() -> String {
    // SAFETY: never NULL, NUL-terminated, valid until the next call on this thread.
    unsafe { CStr::from_ptr(memshadow_last_error()) }
        .to_str()
        .unwrap()
        .to_owned()
}

fn status_name(s: Status) -> String {
    // SAFETY: a static string for every code.
    unsafe { CStr::from_ptr(memshadow_status_name(s as i32)) }
        .to_str()
        .unwrap()
        .to_owned()
}

/// A client bound to a fake daemon that answers whatever `answer` says after the handshake
/// and the bind.
fn fake_client(answer: impl Fn(Request) -> Response + Send + 'static) -> *mut FfiClient {
    let limits = Limits {
        max_read: MAX_READ as u32,
        ..Limits::default()
    };
    let (a, _daemon) = fake_daemon::spawn(limits, move |r, _| match r {
        Request::Bind { .. } => None,
        r => Some(answer(r.clone())),
    });
    new_client(Client::builder().socket_fd(a).connect().unwrap())
}

/// A fake daemon that mirrors anything as mirror 9, serves reads with `offset as u8`
/// bytes (NotMirrored from 1 MiB on), and has two counters.
fn good_daemon() -> *mut FfiClient {
    fake_client(|r| match r {
        Request::Attach { .. } => Response::Attached { mirror_id: 9 },
        Request::Read { offset, len, .. } if offset < 1 << 20 => Response::Data {
            bytes: vec![offset as u8; len as usize],
        },
        Request::Read { .. } => Response::error(ErrorCode::NotMirrored, "unmapped"),
        Request::Populate { len, .. } => Response::Populated { pages: len / 4096 },
        Request::Detach { .. } => Response::Detached,
        Request::ClientStats => Response::Counters {
            entries: vec![("client.reads".into(), 3), ("client.faults".into(), 2)],
        },
        Request::Status => Response::StatusReport {
            info: vec![("daemon.version".into(), fake_daemon::FAKE_VERSION.into())],
            counters: vec![("shadow.slots_in_use".into(), 7)],
        },
        _ => Response::error(ErrorCode::Internal, "unexpected"),
    })
}

fn attach(c: *const FfiClient, addr: usize, len: usize) -> (Status, *mut FfiMirror) {
    let mut m = std::ptr::dangling_mut::<FfiMirror>();
    // SAFETY: `c` is a live handle or NULL; `m` is writable.
    let s = unsafe { memshadow_attach(c, addr as *const c_void, len, &mut m) };
    (s, m)
}

#[test]
fn null_pointers_are_invalid_arguments_with_a_message() {
    let mut out_client = std::ptr::dangling_mut::<FfiClient>();
    let mut out_stats = std::ptr::dangling_mut::<FfiStats>();
    let mut byte = 0u8;
    let mut value = 0u64;
    let invalid = |s: Status, msg: &str| {
        assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT, "{msg}");
        assert_eq!(last_error(), msg);
        assert_eq!(last_errno(), 0, "{msg}: no system call failed");
    };
    // SAFETY: every pointer is NULL or valid (so in the calls below).
    let s = unsafe { memshadow_connect(null_mut()) };
    invalid(s, "out is NULL");
    // SAFETY: as above.
    let s = unsafe { memshadow_connect_to(null(), &mut out_client) };
    invalid(s, "path is NULL");
    // SAFETY: as above.
    let s = unsafe { memshadow_connect_to(c"/nonexistent".as_ptr(), null_mut()) };
    invalid(s, "out is NULL");
    invalid(attach(null(), 4096, 4096).0, "client is NULL");
    // SAFETY: as above.
    let s = unsafe { memshadow_attach(null(), 4096 as *const c_void, 4096, null_mut()) };
    invalid(s, "out is NULL");
    // SAFETY: as above.
    let s = unsafe { memshadow_mirror_read(null(), 0, (&raw mut byte).cast(), 1) };
    invalid(s, "mirror is NULL");
    // SAFETY: as above.
    let s = unsafe { memshadow_mirror_populate(null(), 0, 1, null_mut()) };
    invalid(s, "mirror is NULL");
    // SAFETY: as above.
    invalid(unsafe { memshadow_mirror_detach(null()) }, "mirror is NULL");
    // SAFETY: as above.
    let s = unsafe { memshadow_client_stats(null(), &mut out_stats) };
    invalid(s, "client is NULL");
    // SAFETY: as above.
    let s = unsafe { memshadow_daemon_stats(null(), null_mut()) };
    invalid(s, "out is NULL");
    // SAFETY: as above.
    let s = unsafe { memshadow_stats_entry(null(), 0, null_mut(), null_mut()) };
    invalid(s, "stats is NULL");
    // SAFETY: as above.
    let s = unsafe { memshadow_stats_get(null(), c"x".as_ptr(), &mut value) };
    invalid(s, "stats is NULL");
    assert!(out_client.is_null(), "out pointers are cleared on failure");
    assert!(out_stats.is_null());
    // Getters give 0/NULL and say why; frees ignore NULL.
    // SAFETY: NULL handles.
    unsafe {
        assert_eq!(memshadow_client_page_size(null()), 0);
    }
    assert_eq!(last_error(), "client is NULL");
    // SAFETY: NULL handles.
    assert_eq!(unsafe { memshadow_client_protocol_version(null()) }, 0);
    // SAFETY: NULL handles.
    assert!(unsafe { memshadow_client_daemon_version(null()) }.is_null());
    // SAFETY: NULL handles.
    assert_eq!(unsafe { memshadow_mirror_id(null()) }, 0);
    // SAFETY: NULL handles.
    assert_eq!(unsafe { memshadow_mirror_len(null()) }, 0);
    // SAFETY: NULL handles.
    assert_eq!(unsafe { memshadow_stats_count(null()) }, 0);
    // SAFETY: NULL handles are ignored.
    unsafe { memshadow_client_free(null_mut()) };
    // SAFETY: NULL handles are ignored.
    unsafe { memshadow_mirror_free(null_mut()) };
    // SAFETY: NULL handles are ignored.
    unsafe { memshadow_stats_free(null_mut()) };
    assert_eq!(last_error(), "", "a successful call clears the last error");
}

#[test]
fn null_buffers_and_addresses_with_a_live_client() {
    let c = good_daemon();
    assert_eq!(attach(c, 0, 4096).0, MEMSHADOW_ERR_INVALID_ARGUMENT);
    assert_eq!(last_error(), "ptr is NULL");
    let (s, m) = attach(c, 0x10000, 2 << 20);
    assert_eq!(s, MEMSHADOW_OK);
    // SAFETY: a live mirror; NULL buffer.
    let s = unsafe { memshadow_mirror_read(m, 0, null_mut(), 16) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    assert_eq!(last_error(), "buf is NULL");
    let mut byte = 0u8;
    // SAFETY: a live mirror; a 1-byte buffer but a length that can be no allocation
    // (refused before the buffer is touched).
    let s = unsafe { memshadow_mirror_read(m, 0, (&raw mut byte).cast(), usize::MAX) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    let stats = client_stats(c);
    let mut v = 0u64;
    // SAFETY: a live stats handle; NULL name.
    let s = unsafe { memshadow_stats_get(stats, null(), &mut v) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    // SAFETY: a live stats handle; NULL value.
    let s = unsafe { memshadow_stats_get(stats, c"client.reads".as_ptr(), null_mut()) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    // SAFETY: live handles, freed once.
    unsafe { memshadow_stats_free(stats) };
    // SAFETY: live handles, freed once.
    unsafe { memshadow_mirror_free(m) };
    // SAFETY: live handles, freed once.
    unsafe { memshadow_client_free(c) };
}

fn client_stats(c: *const FfiClient) -> *mut FfiStats {
    let mut stats = null_mut();
    // SAFETY: a live client; `stats` is writable.
    let s = unsafe { memshadow_client_stats(c, &mut stats) };
    assert_eq!(s, MEMSHADOW_OK);
    stats
}

#[test]
fn a_session_through_the_c_api() {
    let c = good_daemon();
    // SAFETY: a live client handle.
    unsafe {
        assert_eq!(memshadow_client_page_size(c), 4096);
    }
    // SAFETY: a live client handle.
    assert_eq!(unsafe { memshadow_client_protocol_version(c) }, VERSION);
    // SAFETY: a live client handle.
    let v = unsafe { memshadow_client_daemon_version(c) };
    // SAFETY: a C string that lives as long as the handle.
    let v = unsafe { CStr::from_ptr(v) };
    assert_eq!(v.to_str().unwrap(), fake_daemon::FAKE_VERSION);
    let (s, m) = attach(c, 0x10000, 2 << 20);
    assert_eq!(s, MEMSHADOW_OK);
    // SAFETY: a live mirror handle.
    assert_eq!(unsafe { memshadow_mirror_id(m) }, 9);
    // SAFETY: a live mirror handle.
    assert_eq!(unsafe { memshadow_mirror_len(m) }, 2 << 20);
    let mut buf = vec![0u8; 3 * 4096];
    // SAFETY: a live mirror; `buf` is writable for its length.
    let s = unsafe { memshadow_mirror_read(m, 4096, buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(s, MEMSHADOW_OK);
    assert!(buf.iter().all(|&b| b == 0), "offset 4096 as u8 is 0");
    // SAFETY: as above.
    let s = unsafe { memshadow_mirror_read(m, 5, buf.as_mut_ptr().cast(), 1) };
    assert_eq!((s, buf[0]), (MEMSHADOW_OK, 5));
    // SAFETY: as above.
    let s = unsafe { memshadow_mirror_read(m, 1 << 20, buf.as_mut_ptr().cast(), 1) };
    assert_eq!(s, MEMSHADOW_ERR_NOT_MIRRORED);
    assert_eq!(last_error(), "not mirrored: unmapped");
    assert_eq!(last_errno(), 0, "a refusal of the daemon has no errno");
    // SAFETY: as above.
    let s = unsafe { memshadow_mirror_read(m, 2 << 20, buf.as_mut_ptr().cast(), 1) };
    assert_eq!(s, MEMSHADOW_ERR_BAD_RANGE);
    let mut pages = 0usize;
    // SAFETY: a live mirror; `pages` is writable.
    let s = unsafe { memshadow_mirror_populate(m, 0, 8192, &mut pages) };
    assert_eq!((s, pages), (MEMSHADOW_OK, 2));
    // SAFETY: a live mirror; no pages wanted.
    let s = unsafe { memshadow_mirror_populate(m, 0, 8192, null_mut()) };
    assert_eq!(s, MEMSHADOW_OK);

    let stats = client_stats(c);
    // SAFETY: a live stats handle.
    assert_eq!(unsafe { memshadow_stats_count(stats) }, 2);
    let (mut name, mut value) = (null(), 0u64);
    // SAFETY: a live stats handle; writable out pointers.
    let s = unsafe { memshadow_stats_entry(stats, 1, &mut name, &mut value) };
    assert_eq!(s, MEMSHADOW_OK);
    // SAFETY: valid as long as the stats handle.
    let n = unsafe { CStr::from_ptr(name) };
    assert_eq!((n.to_str().unwrap(), value), ("client.faults", 2));
    // SAFETY: as above.
    let s = unsafe { memshadow_stats_entry(stats, 2, &mut name, &mut value) };
    assert_eq!(s, MEMSHADOW_ERR_BAD_RANGE);
    // SAFETY: a live stats handle; a C string; writable value.
    let s = unsafe { memshadow_stats_get(stats, c"client.reads".as_ptr(), &mut value) };
    assert_eq!((s, value), (MEMSHADOW_OK, 3));
    // SAFETY: as above.
    let s = unsafe { memshadow_stats_get(stats, c"nope".as_ptr(), &mut value) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    assert_eq!(last_error(), "no counter nope");
    // SAFETY: freed once.
    unsafe { memshadow_stats_free(stats) };
    let mut daemon = null_mut();
    // SAFETY: a live client; writable out pointer.
    let s = unsafe { memshadow_daemon_stats(c, &mut daemon) };
    assert_eq!(s, MEMSHADOW_OK);
    // SAFETY: a live stats handle; a C string; writable value.
    let s = unsafe { memshadow_stats_get(daemon, c"shadow.slots_in_use".as_ptr(), &mut value) };
    assert_eq!((s, value), (MEMSHADOW_OK, 7));
    // SAFETY: freed once.
    unsafe { memshadow_stats_free(daemon) };

    // SAFETY: a live mirror; detaching twice is a no-op.
    assert_eq!(unsafe { memshadow_mirror_detach(m) }, MEMSHADOW_OK);
    // SAFETY: as above.
    assert_eq!(unsafe { memshadow_mirror_detach(m) }, MEMSHADOW_OK);
    // The client goes first: the mirror keeps the connection.
    // SAFETY: freed once.
    unsafe { memshadow_client_free(c) };
    // SAFETY: a live mirror.
    assert_eq!(unsafe { memshadow_mirror_len(m) }, 2 << 20);
    // SAFETY: freed once.
    unsafe { memshadow_mirror_free(m) };
}

/// Each error kind the daemon can send arrives in C as its own code.
#[test]
fn daemon_refusals_map_to_their_codes() {
    let cases = [
        (ErrorCode::NotMirrored, MEMSHADOW_ERR_NOT_MIRRORED),
        (ErrorCode::NoSuchMirror, MEMSHADOW_ERR_NO_SUCH_MIRROR),
        (ErrorCode::NoSuchClient, MEMSHADOW_ERR_NO_SUCH_CLIENT),
        (ErrorCode::QuotaExceeded, MEMSHADOW_ERR_QUOTA_EXCEEDED),
        (ErrorCode::AlreadyWatched, MEMSHADOW_ERR_ALREADY_WATCHED),
        (ErrorCode::BadRange, MEMSHADOW_ERR_BAD_RANGE),
        (ErrorCode::Overlap, MEMSHADOW_ERR_OVERLAP),
        (ErrorCode::TooManyClients, MEMSHADOW_ERR_TOO_MANY_CLIENTS),
        (ErrorCode::PermissionDenied, MEMSHADOW_ERR_PERMISSION_DENIED),
        (ErrorCode::ProtocolVersion, MEMSHADOW_ERR_PROTOCOL_VERSION),
        (ErrorCode::BadMessage, MEMSHADOW_ERR_PROTOCOL),
        (ErrorCode::ShuttingDown, MEMSHADOW_ERR_DAEMON_GONE),
        (ErrorCode::AccessFailed, MEMSHADOW_ERR_DAEMON),
        (ErrorCode::NoSuchGrant, MEMSHADOW_ERR_NO_SUCH_GRANT),
        (ErrorCode::Evicted, MEMSHADOW_ERR_EVICTED),
        (ErrorCode::Other(77), MEMSHADOW_ERR_DAEMON),
    ];
    let (tx, rx) = mpsc::channel::<ErrorCode>();
    let rx = std::sync::Mutex::new(rx);
    let c = fake_client(move |_| {
        let code = rx.lock().unwrap().recv().unwrap();
        Response::error(code, "refused")
    });
    for (code, want) in cases {
        tx.send(code).unwrap();
        let (s, m) = attach(c, 0x10000, 4096);
        assert_eq!(s, want, "{code:?}");
        assert!(m.is_null());
        // `DaemonGone` has a message of its own.
        let said = if code == ErrorCode::ShuttingDown {
            "memshadowd is gone"
        } else {
            "refused"
        };
        assert!(last_error().contains(said), "{code:?}: {}", last_error());
    }
    // SAFETY: freed once.
    unsafe { memshadow_client_free(c) };
}

/// Every variant of the Rust error has its own code and name (the match in `Status::of`
/// is exhaustive, so a new variant cannot be forgotten).
#[test]
fn every_error_variant_has_a_distinct_code_and_name() {
    let io = || std::io::Error::from_raw_os_error(libc::EACCES);
    let errors = [
        Error::NoSocketPath,
        Error::Connect {
            path: "/x".into(),
            source: nix::Error::ENOENT,
        },
        Error::DaemonGone,
        Error::ProtocolVersion("v".into()),
        Error::NotDumpable(io()),
        Error::Uffd(io()),
        Error::Proc("/proc/self/mem", io()),
        Error::NotMirrored("m".into()),
        Error::NoSuchMirror("m".into()),
        Error::NoSuchClient("c".into()),
        Error::Unsupported("u".into()),
        Error::QuotaExceeded("q".into()),
        Error::ShadowFull("s".into()),
        Error::OutOfResources("o".into()),
        Error::AlreadyWatched("w".into()),
        Error::BadRange("r".into()),
        Error::Overlap("o".into()),
        Error::TooManyClients("t".into()),
        Error::PermissionDenied("p".into()),
        Error::Protocol("p".into()),
        Error::Daemon {
            code: ErrorCode::Internal,
            message: "i".into(),
        },
        Error::Socket(SocketError::Closed),
        Error::NoSuchGrant("g".into()),
        Error::Evicted("e".into()),
    ];
    let mut codes: Vec<Status> = errors.iter().map(Status::of).collect();
    codes.extend([
        MEMSHADOW_OK,
        MEMSHADOW_ERR_INVALID_ARGUMENT,
        MEMSHADOW_ERR_INTERNAL,
    ]);
    let mut sorted: Vec<i32> = codes.iter().map(|&s| s as i32).collect();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), codes.len(), "codes are distinct: {codes:?}");
    assert_eq!(
        codes.len(),
        Status::ALL.len(),
        "Status::ALL lists every code"
    );
    for s in Status::ALL {
        assert_eq!(status_name(s), format!("{s:?}"));
        assert!(s == MEMSHADOW_OK || (s as i32) < 0);
    }
    assert!(memshadow_status_name(1).is_null());
    assert!(memshadow_status_name(-1000).is_null());
    // The message carries the cause.
    let f = Failure::from(Error::Connect {
        path: "/x".into(),
        source: nix::Error::ENOENT,
    });
    assert_eq!(f.status, MEMSHADOW_ERR_CONNECT);
    assert_eq!(
        f.message,
        "cannot connect to memshadowd at /x: ENOENT: No such file or directory"
    );
}

/// A socket that refuses this user is a permission error, with the errno of `connect` and
/// the hint of the Rust library (tests/discovery.rs makes a real one, as a plain user).
#[test]
fn a_socket_that_refuses_this_user_is_permission_denied_with_its_errno() {
    let f = Failure::from(Error::ConnectDenied {
        path: "/run/memshadow/memshadowd.sock".into(),
        hint: "join group memshadow".into(),
        errno: nix::Error::EACCES,
    });
    assert_eq!(f.status, MEMSHADOW_ERR_PERMISSION_DENIED);
    assert_eq!(f.errno, libc::EACCES);
    assert_eq!(
        f.message,
        "permission denied connecting to memshadowd at /run/memshadow/memshadowd.sock: join \
         group memshadow"
    );
}

/// `memshadow_attach_with` sends each policy as the Rust library's `attach_with` (and the
/// default as `memshadow_attach`), and refuses an unknown policy or a misplaced period
/// before asking the daemon.
#[test]
fn attach_with_sends_the_policy_it_was_given() {
    let (tx, seen) = mpsc::channel::<AttachPolicy>();
    let tx = std::sync::Mutex::new(tx);
    let c = fake_client(move |r| match r {
        Request::Attach { policy, .. } => {
            tx.lock().unwrap().send(policy).unwrap();
            Response::Attached { mirror_id: 5 }
        }
        Request::Detach { .. } => Response::Detached,
        _ => Response::error(ErrorCode::Internal, "unexpected"),
    });
    let attach_with = |policy: u32, period_ms: u64| {
        let mut m = std::ptr::dangling_mut::<FfiMirror>();
        // SAFETY: a live handle and a writable out pointer; the address is never touched.
        let s = unsafe {
            memshadow_attach_with(c, 0x10000 as *const c_void, 4096, policy, period_ms, &mut m)
        };
        (s, m)
    };
    for (policy, period, wire) in [
        (MEMSHADOW_POLICY_DEFAULT, 0, AttachPolicy::Default),
        (MEMSHADOW_POLICY_MANUAL, 0, AttachPolicy::Manual),
        (MEMSHADOW_POLICY_LAZY, 0, AttachPolicy::Lazy),
        (MEMSHADOW_POLICY_STRICT, 0, AttachPolicy::Strict),
        (
            MEMSHADOW_POLICY_PERIODIC,
            25,
            AttachPolicy::Periodic { period_ms: 25 },
        ),
    ] {
        let (s, m) = attach_with(policy, period);
        assert_eq!(s, MEMSHADOW_OK, "{policy}: {}", last_error());
        assert_eq!(seen.try_recv().unwrap(), wire);
        // SAFETY: a live mirror handle.
        assert_eq!(unsafe { memshadow_mirror_id(m) }, 5);
        // SAFETY: freed once.
        unsafe { memshadow_mirror_free(m) };
    }
    for (policy, period, said) in [
        (5, 0, "5 is no policy"),
        (
            MEMSHADOW_POLICY_LAZY,
            10,
            "MEMSHADOW_POLICY_LAZY has no period",
        ),
        (u32::MAX, 0, "is no policy"),
        (MEMSHADOW_POLICY_PERIODIC, 0, "needs a period_ms"),
        (
            MEMSHADOW_POLICY_MANUAL,
            10,
            "MEMSHADOW_POLICY_MANUAL has no period",
        ),
        (
            MEMSHADOW_POLICY_DEFAULT,
            1,
            "MEMSHADOW_POLICY_DEFAULT has no period",
        ),
    ] {
        let (s, m) = attach_with(policy, period);
        assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT, "{policy}/{period}");
        assert!(m.is_null());
        assert!(last_error().contains(said), "{}", last_error());
        assert!(seen.try_recv().is_err(), "nothing was sent to the daemon");
    }
    // NULL arguments, as for memshadow_attach.
    let mut m = std::ptr::dangling_mut::<FfiMirror>();
    // SAFETY: NULL is checked.
    let s = unsafe { memshadow_attach_with(null(), 0x10000 as *const c_void, 4096, 0, 0, &mut m) };
    assert_eq!(
        (s, last_error().as_str()),
        (MEMSHADOW_ERR_INVALID_ARGUMENT, "client is NULL")
    );
    // SAFETY: NULL is checked.
    let s = unsafe { memshadow_attach_with(c, null(), 4096, 0, 0, &mut m) };
    assert_eq!(
        (s, last_error().as_str()),
        (MEMSHADOW_ERR_INVALID_ARGUMENT, "ptr is NULL")
    );
    // SAFETY: NULL is checked.
    let s = unsafe { memshadow_attach_with(c, 0x10000 as *const c_void, 4096, 0, 0, null_mut()) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    // SAFETY: freed once.
    unsafe { memshadow_client_free(c) };
}

#[test]
fn connect_to_a_missing_socket_is_a_connect_error() {
    let mut c = std::ptr::dangling_mut::<FfiClient>();
    // SAFETY: a C string and a writable out pointer.
    let s = unsafe { memshadow_connect_to(c"/nonexistent/memshadow.sock".as_ptr(), &mut c) };
    assert_eq!(s, MEMSHADOW_ERR_CONNECT);
    assert_eq!(last_errno(), libc::ENOENT, "the errno of connect(2)");
    assert!(c.is_null());
    assert!(
        last_error().starts_with("cannot connect to memshadowd at /nonexistent/memshadow.sock: "),
        "{}",
        last_error()
    );
}

#[test]
fn the_last_error_is_per_thread() {
    // SAFETY: NULL is checked.
    let s = unsafe { memshadow_connect(null_mut()) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    let other = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(other, "");
    assert_eq!(last_error(), "out is NULL");
    // Asking twice does not clear it.
    assert_eq!(last_error(), "out is NULL");
}

#[test]
fn a_panic_becomes_an_internal_error() {
    let s = guard(|| panic!("boom"));
    assert_eq!(s, MEMSHADOW_ERR_INTERNAL);
    assert_eq!(last_error(), "internal error in libmemshadow (panic: boom)");
}

/// The errno is set with the message and cleared by the next successful call; asking for
/// it (or the message) changes neither.
#[test]
fn the_last_errno_follows_the_last_call() {
    let mut c = std::ptr::dangling_mut::<FfiClient>();
    // SAFETY: a C string and a writable out pointer.
    let s = unsafe { memshadow_connect_to(c"/nonexistent/d.sock".as_ptr(), &mut c) };
    assert_eq!(s, MEMSHADOW_ERR_CONNECT);
    assert_eq!(last_errno(), libc::ENOENT);
    assert!(!last_error().is_empty());
    assert!(!memshadow_status_name(s as i32).is_null());
    assert_eq!(last_errno(), libc::ENOENT, "unchanged by the getters");
    let other = std::thread::spawn(last_errno).join().unwrap();
    assert_eq!(other, 0, "per thread");
    // SAFETY: a NULL handle is ignored, successfully.
    unsafe { memshadow_stats_free(null_mut()) };
    assert_eq!(last_errno(), 0);
    // An errno from deeper down: Error::Socket -> SocketError::Io -> Errno.
    let f = Failure::from(Error::Socket(SocketError::Io(nix::Error::EMSGSIZE)));
    assert_eq!((f.status, f.errno), (MEMSHADOW_ERR_SOCKET, libc::EMSGSIZE));
    let f = Failure::from(Error::Uffd(std::io::Error::from_raw_os_error(libc::EPERM)));
    assert_eq!((f.status, f.errno), (MEMSHADOW_ERR_UFFD, libc::EPERM));
}

#[test]
fn the_library_version_is_the_crate_version() {
    // SAFETY: a static C string.
    let v = unsafe { CStr::from_ptr(memshadow_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

/// The two errors of external engines have codes of their own, appended after the codes of
/// 0.1 (whose values never change), with the Rust library's message.
#[test]
fn the_engine_errors_have_codes_of_their_own() {
    assert_eq!(
        MEMSHADOW_ERR_OUT_OF_RESOURCES as i32, -24,
        "0.1's last code"
    );
    assert_eq!(MEMSHADOW_ERR_NO_SUCH_GRANT as i32, -25);
    assert_eq!(MEMSHADOW_ERR_EVICTED as i32, -26);
    let f = Failure::from(Error::NoSuchGrant("wrong token".into()));
    assert_eq!(
        (f.status, f.message.as_str(), f.errno),
        (MEMSHADOW_ERR_NO_SUCH_GRANT, "no such grant: wrong token", 0)
    );
    let f = Failure::from(Error::Evicted("too slow".into()));
    assert_eq!(
        (f.status, f.message.as_str(), f.errno),
        (MEMSHADOW_ERR_EVICTED, "engine evicted: too slow", 0)
    );
    assert_eq!(
        status_name(MEMSHADOW_ERR_NO_SUCH_GRANT),
        "MEMSHADOW_ERR_NO_SUCH_GRANT"
    );
    assert_eq!(status_name(MEMSHADOW_ERR_EVICTED), "MEMSHADOW_ERR_EVICTED");
}

fn to_hex(token: &memshadow_token) -> (Status, String) {
    let mut buf = [0x55 as c_char; MEMSHADOW_TOKEN_HEX_SIZE];
    // SAFETY: a token and a buffer of its size.
    let s = unsafe { memshadow_token_to_hex(token, buf.as_mut_ptr(), buf.len()) };
    // SAFETY: NUL-terminated after a success (checked below for failures).
    let text = unsafe { CStr::from_ptr(buf.as_ptr()) };
    (s, text.to_str().unwrap().to_owned())
}

fn from_hex(text: &CStr) -> (Status, memshadow_token) {
    let mut t = memshadow_token { bytes: [0xAA; 16] };
    // SAFETY: a C string and a writable token.
    let s = unsafe { memshadow_token_from_hex(text.as_ptr(), &mut t) };
    (s, t)
}

/// A token is 16 little-endian bytes in C and 32 hex digits of the number as text, the
/// text the Rust library's `{:032x}` gives; the text goes back to the same token.
#[test]
fn tokens_go_to_hex_and_back() {
    for v in [
        1u128,
        0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        u128::MAX,
        1 << 127,
    ] {
        let t = memshadow_token::of(v);
        assert_eq!(t.bytes, v.to_le_bytes());
        assert_eq!(t.value(), v);
        let (s, hex) = to_hex(&t);
        assert_eq!(s, MEMSHADOW_OK);
        assert_eq!(hex, format!("{v:032x}"));
        let c = CString::new(hex).unwrap();
        assert_eq!(from_hex(&c), (MEMSHADOW_OK, t));
    }
    let t = memshadow_token::of(0x1234_5678);
    assert_eq!(
        t.bytes[..4],
        [0x78, 0x56, 0x34, 0x12],
        "least significant byte first"
    );
    assert_eq!(to_hex(&t).1, "00000000000000000000000012345678");
    // Short forms (Rust's `{:x}`) and upper case are read too.
    assert_eq!(from_hex(c"12345678"), (MEMSHADOW_OK, t));
    assert_eq!(
        from_hex(c"ABCdef"),
        (MEMSHADOW_OK, memshadow_token::of(0xabcdef))
    );
    assert_eq!(from_hex(c"0").1, memshadow_token::default());
}

#[test]
fn a_token_that_is_no_hex_number_is_refused() {
    for bad in [
        c"",
        c"0x12",
        c" 12",
        c"12\n",
        c"12 ",
        c"g",
        c"-1",
        c"+1",
        c"123456789012345678901234567890123",
    ] {
        let (s, t) = from_hex(bad);
        assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT, "{bad:?}");
        assert_eq!(t, memshadow_token::default(), "{bad:?}: left all zeros");
        assert!(last_error().contains("is no token"), "{}", last_error());
    }
    let mut t = memshadow_token { bytes: [1; 16] };
    // SAFETY: NULL is checked; `t` is writable.
    let s = unsafe { memshadow_token_from_hex(null(), &mut t) };
    assert_eq!(
        (s, last_error().as_str()),
        (MEMSHADOW_ERR_INVALID_ARGUMENT, "hex is NULL")
    );
    assert_eq!(t, memshadow_token::default());
    // SAFETY: NULL is checked.
    let s = unsafe { memshadow_token_from_hex(c"12".as_ptr(), null_mut()) };
    assert_eq!(
        (s, last_error().as_str()),
        (MEMSHADOW_ERR_INVALID_ARGUMENT, "out is NULL")
    );
}

#[test]
fn token_to_hex_needs_room_for_33_bytes() {
    let t = memshadow_token::of(7);
    let mut buf = [0x55 as c_char; MEMSHADOW_TOKEN_HEX_SIZE];
    // SAFETY: `buf` has 32 bytes of room at least.
    let s = unsafe { memshadow_token_to_hex(&t, buf.as_mut_ptr(), 32) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("MEMSHADOW_TOKEN_HEX_SIZE"),
        "{}",
        last_error()
    );
    assert_eq!(buf[0], 0, "a buffer too small gets \"\"");
    assert_eq!(buf[1], 0x55, "and nothing more");
    // SAFETY: NULL is checked.
    let s = unsafe { memshadow_token_to_hex(&t, null_mut(), 33) };
    assert_eq!(
        (s, last_error().as_str()),
        (MEMSHADOW_ERR_INVALID_ARGUMENT, "buf is NULL")
    );
    // SAFETY: a size of 0: nothing is written.
    let s = unsafe { memshadow_token_to_hex(&t, buf.as_mut_ptr(), 0) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    // SAFETY: NULL token; `buf` is writable.
    let s = unsafe { memshadow_token_to_hex(null(), buf.as_mut_ptr(), buf.len()) };
    assert_eq!(
        (s, last_error().as_str()),
        (MEMSHADOW_ERR_INVALID_ARGUMENT, "token is NULL")
    );
    assert_eq!(buf[0], 0);
}

/// `memshadow_mirror_grant` asks the daemon for a grant of the mirror and hands back its
/// token as little-endian bytes; a refusal leaves the token all zeros.
#[test]
fn a_grant_through_the_c_api() {
    const TOKEN: u128 = 0x00ff_0102_0304_0506_0708_090a_0b0c_0d0e;
    let (tx, seen) = mpsc::channel::<u64>();
    let tx = std::sync::Mutex::new(tx);
    let c = fake_client(move |r| match r {
        Request::Attach { .. } => Response::Attached { mirror_id: 4 },
        Request::Grant { mirror_id } => {
            tx.lock().unwrap().send(mirror_id).unwrap();
            match mirror_id {
                4 => Response::Granted { token: TOKEN },
                _ => Response::error(ErrorCode::NoSuchMirror, "no mirror"),
            }
        }
        Request::Detach { .. } => Response::Detached,
        _ => Response::error(ErrorCode::Internal, "unexpected"),
    });
    let (s, m) = attach(c, 0x10000, 4096);
    assert_eq!(s, MEMSHADOW_OK);
    let mut t = memshadow_token { bytes: [9; 16] };
    // SAFETY: a live mirror and a writable token.
    let s = unsafe { memshadow_mirror_grant(m, &mut t) };
    assert_eq!(s, MEMSHADOW_OK, "{}", last_error());
    assert_eq!(seen.try_recv().unwrap(), 4);
    assert_eq!(t.bytes, TOKEN.to_le_bytes());
    assert_eq!(to_hex(&t).1, "00ff0102030405060708090a0b0c0d0e");
    // SAFETY: NULL is checked.
    let s = unsafe { memshadow_mirror_grant(m, null_mut()) };
    assert_eq!(
        (s, last_error().as_str()),
        (MEMSHADOW_ERR_INVALID_ARGUMENT, "token_out is NULL")
    );
    let mut t = memshadow_token { bytes: [9; 16] };
    // SAFETY: NULL is checked; `t` is writable.
    let s = unsafe { memshadow_mirror_grant(null(), &mut t) };
    assert_eq!(
        (s, last_error().as_str()),
        (MEMSHADOW_ERR_INVALID_ARGUMENT, "mirror is NULL")
    );
    assert_eq!(t, memshadow_token::default(), "cleared on failure");
    // SAFETY: freed once.
    unsafe { memshadow_mirror_free(m) };
    // SAFETY: freed once.
    unsafe { memshadow_client_free(c) };
}

/// A grant of token 0 would be a daemon's bug: refused, and the token left all zeros.
#[test]
fn a_grant_of_token_zero_is_a_protocol_error() {
    let c = fake_client(|r| match r {
        Request::Attach { .. } => Response::Attached { mirror_id: 1 },
        Request::Grant { .. } => Response::Granted { token: 0 },
        Request::Detach { .. } => Response::Detached,
        _ => Response::error(ErrorCode::Internal, "unexpected"),
    });
    let (_, m) = attach(c, 0x10000, 4096);
    let mut t = memshadow_token { bytes: [9; 16] };
    // SAFETY: a live mirror and a writable token.
    let s = unsafe { memshadow_mirror_grant(m, &mut t) };
    assert_eq!(s, MEMSHADOW_ERR_PROTOCOL);
    assert_eq!(t, memshadow_token::default());
    // SAFETY: freed once.
    unsafe { memshadow_mirror_free(m) };
    // SAFETY: freed once.
    unsafe { memshadow_client_free(c) };
}

/// Every engine call checks its pointers; getters of a NULL engine give 0 (the fd -1); a
/// token of 0 and a pid of 0 are refused before any connection is made; freeing NULL is a
/// no-op.
#[test]
fn engine_calls_check_their_arguments() {
    let invalid = |s: Status, msg: &str| {
        assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT, "{msg}");
        assert_eq!(last_error(), msg);
        assert_eq!(last_errno(), 0, "{msg}");
    };
    let token = memshadow_token::of(5);
    let mut e = std::ptr::dangling_mut::<FfiEngine>();
    // SAFETY: every pointer is NULL or valid (so in the calls below).
    let s = unsafe { memshadow_engine_attach(null(), &token, null_mut()) };
    invalid(s, "out is NULL");
    // SAFETY: as above.
    let s = unsafe { memshadow_engine_attach(null(), null(), &mut e) };
    invalid(s, "token is NULL");
    assert!(e.is_null(), "out pointers are cleared on failure");
    // SAFETY: as above.
    let s = unsafe { memshadow_engine_attach_pid(null(), 1, 1, null_mut()) };
    invalid(s, "out is NULL");
    let mut byte = 0u8;
    let mut written = 7usize;
    // SAFETY: as above.
    let s = unsafe { memshadow_engine_read(null_mut(), 0, (&raw mut byte).cast(), 1) };
    invalid(s, "engine is NULL");
    // SAFETY: as above.
    let s =
        unsafe { memshadow_engine_write(null_mut(), 0, (&raw const byte).cast(), 1, &mut written) };
    invalid(s, "engine is NULL");
    assert_eq!(written, 0, "nothing written");
    // SAFETY: as above.
    invalid(
        unsafe { memshadow_engine_poll(null_mut()) },
        "engine is NULL",
    );
    let mut counters = memshadow_engine_counters {
        faults: 3,
        ..Default::default()
    };
    // SAFETY: as above.
    let s = unsafe { memshadow_engine_stats(null(), &mut counters) };
    invalid(s, "engine is NULL");
    assert_eq!(counters.faults, 0, "cleared on failure");
    // SAFETY: as above.
    let s = unsafe { memshadow_engine_stats(null(), null_mut()) };
    invalid(s, "out is NULL");
    // SAFETY: NULL handles.
    unsafe {
        assert_eq!(memshadow_engine_fd(null()), -1);
    }
    assert_eq!(last_error(), "engine is NULL");
    // SAFETY: NULL handles.
    assert_eq!(unsafe { memshadow_engine_id(null()) }, 0);
    // SAFETY: NULL handles.
    assert_eq!(unsafe { memshadow_engine_mirror_id(null()) }, 0);
    // SAFETY: NULL handles.
    assert_eq!(unsafe { memshadow_engine_addr(null()) }, 0);
    // SAFETY: NULL handles.
    assert_eq!(unsafe { memshadow_engine_len(null()) }, 0);
    // SAFETY: NULL handles.
    assert_eq!(unsafe { memshadow_engine_page_size(null()) }, 0);
    // SAFETY: a NULL handle is ignored.
    unsafe { memshadow_engine_free(null_mut()) };
    assert_eq!(last_error(), "");

    // Refused before connecting: the socket path does not exist, and is not looked at.
    let nowhere = c"/nonexistent/memshadowd.sock";
    let zero = memshadow_token::default();
    // SAFETY: a C string, a token and a writable out pointer.
    let s = unsafe { memshadow_engine_attach(nowhere.as_ptr(), &zero, &mut e) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("never 0"), "{}", last_error());
    // SAFETY: as above.
    let s = unsafe { memshadow_engine_attach_pid(nowhere.as_ptr(), 0, 1, &mut e) };
    assert_eq!(s, MEMSHADOW_ERR_NO_SUCH_CLIENT);
    assert!(e.is_null());
}

/// The engine's session is opened at the socket given (or found as for a client), with the
/// errors of a client's connection.
#[test]
fn an_engine_attach_to_a_missing_socket_is_a_connect_error() {
    let token = memshadow_token::of(5);
    let mut e = std::ptr::dangling_mut::<FfiEngine>();
    // SAFETY: a C string, a token and a writable out pointer.
    let s = unsafe { memshadow_engine_attach(c"/nonexistent/e.sock".as_ptr(), &token, &mut e) };
    assert_eq!(s, MEMSHADOW_ERR_CONNECT);
    assert_eq!(last_errno(), libc::ENOENT);
    assert!(
        last_error().contains("/nonexistent/e.sock"),
        "{}",
        last_error()
    );
    assert!(e.is_null());
    // SAFETY: as above.
    let s = unsafe { memshadow_engine_attach_pid(c"/nonexistent/e.sock".as_ptr(), 1, 1, &mut e) };
    assert_eq!((s, last_errno()), (MEMSHADOW_ERR_CONNECT, libc::ENOENT));
}

/// `memshadow_connect_with` refuses unknown flags before connecting, and connects where
/// `path` says.
#[test]
fn connect_with_checks_its_flags_and_path() {
    let mut c = std::ptr::dangling_mut::<FfiClient>();
    let nowhere = c"/nonexistent/memshadow.sock";
    // SAFETY: a C string and a writable out pointer.
    let s = unsafe { memshadow_connect_with(nowhere.as_ptr(), 2, &mut c) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    assert!(
        last_error().contains("unknown bits 0x2"),
        "{}",
        last_error()
    );
    assert!(c.is_null());
    // SAFETY: as above.
    let s = unsafe { memshadow_connect_with(nowhere.as_ptr(), u32::MAX, &mut c) };
    assert_eq!(s, MEMSHADOW_ERR_INVALID_ARGUMENT);
    for flags in [0, MEMSHADOW_CONNECT_DEVICE_WRITES] {
        // SAFETY: as above.
        let s = unsafe { memshadow_connect_with(nowhere.as_ptr(), flags, &mut c) };
        assert_eq!((s, last_errno()), (MEMSHADOW_ERR_CONNECT, libc::ENOENT));
        assert!(
            last_error().contains("/nonexistent/memshadow.sock"),
            "{}",
            last_error()
        );
    }
    // SAFETY: NULL is checked.
    let s = unsafe { memshadow_connect_with(null(), 0, null_mut()) };
    assert_eq!(
        (s, last_error().as_str()),
        (MEMSHADOW_ERR_INVALID_ARGUMENT, "out is NULL")
    );
}

/// `MEMSHADOW_CONNECT_DEVICE_WRITES` hands the daemon `/proc/self/mem` opened for writing;
/// without it, read-only.
#[test]
fn the_device_writes_flag_hands_over_a_writable_mem_file() {
    for (flags, want) in [
        (0, libc::O_RDONLY),
        (MEMSHADOW_CONNECT_DEVICE_WRITES, libc::O_RDWR),
    ] {
        let (tx, mode) = mpsc::channel::<c_int>();
        let tx = std::sync::Mutex::new(tx);
        let (sock, _daemon) = fake_daemon::spawn(Limits::default(), move |r, fds| {
            if let Request::Bind { .. } = r {
                let fl = nix::fcntl::fcntl(&fds[1], nix::fcntl::FcntlArg::F_GETFL).unwrap();
                tx.lock().unwrap().send(fl & libc::O_ACCMODE).unwrap();
            }
            None
        });
        let client = client_builder(None, flags)
            .unwrap()
            .socket_fd(sock)
            .connect()
            .unwrap();
        assert_eq!(mode.try_recv().unwrap(), want, "flags {flags}");
        drop(client);
    }
}

/// A long device write goes in pieces no larger than a message may carry.
#[test]
fn device_writes_go_in_pieces_the_protocol_carries() {
    assert_eq!(WRITE_CHUNK, memshadow_proto::MAX_READ);
}
