//! In-process tests of the server: a raw-protocol client in this process (its memory is the
//! mirrored memory), and a proptest over the request handler (G7).

#![allow(clippy::unwrap_used)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;

use memshadow_proto::{
    self as proto, AttachPolicy, BindFlags, ErrorCode, EventKind, InvalidateFlags, Request,
    Response, MAX_READ, VERSION,
};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

use super::session::{Peer, Session};
use super::{handler, Core, Server};
use crate::config::Config;
use crate::sys::PAGE_SIZE;

const P: usize = PAGE_SIZE;

struct Daemon {
    core: Arc<Core>,
    thread: Option<JoinHandle<()>>,
    dir: PathBuf,
    path: PathBuf,
}

impl Daemon {
    fn start() -> Daemon {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "memshadow-srv-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let path = dir.join("d.sock");
        let mut cfg = Config::default();
        cfg.device.shadow_capacity = 64 << 20;
        cfg.device.flush_latency = std::time::Duration::from_micros(20);
        let server = Server::new(cfg, &path).unwrap();
        let core = Arc::clone(server.core());
        let thread = std::thread::spawn(move || server.run().unwrap());
        Daemon {
            core,
            thread: Some(thread),
            dir,
            path,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.core.request_stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        assert!(!self.path.exists(), "the socket is unlinked at shutdown");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A raw-protocol client.
struct Raw {
    sock: OwnedFd,
    next: u64,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(path: &std::path::Path) -> Raw {
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        connect(sock.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        Raw {
            sock,
            next: 1,
            buf: Vec::new(),
        }
    }

    fn call(&mut self, req: &Request, fds: &[BorrowedFd<'_>]) -> Response {
        self.next += 1;
        proto::send(
            self.sock.as_fd(),
            req.msg_type(),
            0,
            self.next,
            &req.encode_payload(),
            fds,
        )
        .unwrap();
        let f = proto::recv(self.sock.as_fd(), &mut self.buf).unwrap();
        assert_eq!(f.header.request_id, self.next);
        Response::decode(f.header.msg_type, &f.payload, f.fds.len()).unwrap()
    }

    fn hello(&mut self) {
        let r = self.call(
            &Request::Hello {
                min_version: 1,
                max_version: VERSION,
                name: "test".into(),
            },
            &[],
        );
        assert!(matches!(r, Response::HelloAck { .. }), "{r:?}");
    }

    fn bind(&mut self) -> Response {
        let uffd = raw_uffd();
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        let maps = std::fs::File::open("/proc/self/maps").unwrap();
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        self.call(
            &Request::Bind {
                flags: BindFlags::empty(),
            },
            &[uffd.as_fd(), mem.as_fd(), maps.as_fd(), pagemap.as_fd()],
        )
    }

    fn read(&mut self, mirror_id: u64, offset: u64, len: u32) -> Response {
        self.call(
            &Request::Read {
                mirror_id,
                offset,
                len,
            },
            &[],
        )
    }
}

fn raw_uffd() -> OwnedFd {
    // SAFETY: plain system call; on success the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fresh fd from the kernel.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn data(r: Response) -> Vec<u8> {
    match r {
        Response::Data { bytes } => bytes,
        other => panic!("expected data, got {other:?}"),
    }
}

fn code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Error { code, .. } => Some(*code),
        _ => None,
    }
}

/// A fresh anonymous mapping of `pages` pages filled with `byte` (not a memmap2 object: the
/// test unmaps and moves parts of it).
fn map(pages: usize, byte: u8) -> *mut u8 {
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * P,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: the mapping is ours, `pages * P` bytes long and writable.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), byte, pages * P) };
    p.cast()
}

#[test]
fn munmap_madvise_and_mremap_reach_the_shadow() {
    crate::test_support::needs_full_userfaultfd!();
    let d = Daemon::start();
    let mut c = Raw::connect(&d.path);
    assert_eq!(
        code(&c.call(&Request::Status, &[])),
        Some(ErrorCode::OutOfOrder),
        "status before hello"
    );
    c.hello();
    assert_eq!(
        code(&c.call(
            &Request::Attach {
                addr: 0,
                len: 4096,
                policy: AttachPolicy::Default,
            },
            &[]
        )),
        Some(ErrorCode::OutOfOrder)
    );
    assert!(matches!(c.bind(), Response::Bound { .. }));
    assert_eq!(code(&c.bind()), Some(ErrorCode::OutOfOrder), "second bind");
    let base = map(16, 0xab);
    let addr = base as u64;
    let Response::Attached { mirror_id: id } = c.call(
        &Request::Attach {
            addr,
            len: 16 * P as u64,
            policy: AttachPolicy::Default,
        },
        &[],
    ) else {
        panic!("attach")
    };
    assert_eq!(data(c.read(id, 0, 64)), vec![0xab; 64]);
    // MADV_DONTNEED: the page reads as zeros at once.
    // SAFETY: our own mapping.
    let r = unsafe { libc::madvise(base.cast(), P, libc::MADV_DONTNEED) };
    assert_eq!(r, 0);
    assert_eq!(data(c.read(id, 0, 64)), vec![0; 64]);
    // munmap of the tail: not mirrored any more, even if something else is mapped there.
    // SAFETY: our own mapping.
    let r = unsafe { libc::munmap(base.wrapping_add(12 * P).cast(), 4 * P) };
    assert_eq!(r, 0);
    assert_eq!(
        code(&c.read(id, 13 * P as u64, 8)),
        Some(ErrorCode::NotMirrored)
    );
    assert_eq!(data(c.read(id, 11 * P as u64, 8)), vec![0xab; 8]);
    // mremap the whole rest elsewhere: the mirror follows it.
    let target = map(12, 0);
    // SAFETY: moves our own mapping over our own target mapping.
    let moved = unsafe {
        libc::mremap(
            base.cast(),
            12 * P,
            12 * P,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            target.cast::<libc::c_void>(),
        )
    };
    assert_eq!(moved, target.cast());
    // SAFETY: the moved mapping is ours.
    unsafe { *target.wrapping_add(2 * P) = 0x11 };
    let r = c.read(id, 2 * P as u64, 2);
    assert!(
        matches!(&r, Response::Data { bytes } if bytes == &[0x11, 0xab]),
        "the mirror follows mremap: {r:?}"
    );
    let Response::Counters { entries } = c.call(&Request::ClientStats, &[]) else {
        panic!()
    };
    let get = |k: &str| entries.iter().find(|(n, _)| n == k).map(|e| e.1);
    assert!(get("events.unmap").unwrap() >= 1);
    assert!(get("events.remove").unwrap() >= 1);
    assert_eq!(get("events.remap"), Some(1));
    assert_eq!(
        c.call(&Request::Detach { mirror_id: id }, &[]),
        Response::Detached
    );
    assert_eq!(
        code(&c.call(&Request::Detach { mirror_id: id }, &[])),
        Some(ErrorCode::NoSuchMirror)
    );
    // SAFETY: our own mapping.
    unsafe { libc::munmap(target.cast(), 12 * P) };
}

/// Engine acknowledgement records exist since protocol 3: a session that said 2 may not ask
/// for them (it could not decode them), a session of 3 may; no other unknown bit passes.
#[test]
fn trace_acknowledgement_records_are_protocol_3() {
    let d = Daemon::start();
    let trace = |c: &mut Raw, events: u32| c.call(&Request::Trace { pid: 0, events }, &[]);
    let mut old = Raw::connect(&d.path);
    let r = old.call(
        &Request::Hello {
            min_version: 1,
            max_version: 2,
            name: "v2".into(),
        },
        &[],
    );
    assert!(matches!(r, Response::HelloAck { version: 2, .. }), "{r:?}");
    let r = trace(&mut old, proto::TRACE_ENGINE_ACKS);
    assert_eq!(code(&r), Some(ErrorCode::BadMessage), "{r:?}");
    let mut new = Raw::connect(&d.path);
    new.hello();
    let r = trace(&mut new, 1 << 30);
    assert_eq!(code(&r), Some(ErrorCode::BadMessage), "{r:?}");
    let r = trace(&mut new, proto::TRACE_ENGINE_ACKS);
    assert_eq!(r, Response::TraceStarted);
    // The v2 session may still stream invalidations.
    assert_eq!(trace(&mut old, 0), Response::TraceStarted);
}

#[test]
fn bad_input_gets_clear_errors() {
    crate::test_support::needs_full_userfaultfd!();
    let d = Daemon::start();
    let mut c = Raw::connect(&d.path);
    assert_eq!(
        code(&c.call(
            &Request::Hello {
                min_version: 7,
                max_version: 9,
                name: String::new()
            },
            &[]
        )),
        Some(ErrorCode::ProtocolVersion)
    );
    c.hello();
    // Wrong fds: /dev/null as the uffd, another process's mem.
    let null = std::fs::File::open("/dev/null").unwrap();
    let mem = std::fs::File::open("/proc/self/mem").unwrap();
    assert_eq!(
        code(&c.call(
            &Request::Bind {
                flags: BindFlags::empty()
            },
            &[null.as_fd(), mem.as_fd()]
        )),
        Some(ErrorCode::BadFd)
    );
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let other_mem = std::fs::File::open(format!("/proc/{}/mem", child.id())).unwrap();
    let r = c.call(
        &Request::Bind {
            flags: BindFlags::empty(),
        },
        &[raw_uffd().as_fd(), other_mem.as_fd()],
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        code(&r),
        Some(ErrorCode::BadFd),
        "another process's memory: {r:?}"
    );
    assert!(matches!(c.bind(), Response::Bound { .. }));
    let bogus = [
        (0, 0),
        (4096, 4096 * 3 + 1),
        (u64::MAX - 4095, 4096),
        (0xffff_8000_0000_0000, 4096),
        (4096, 4096),
    ];
    for (addr, len) in bogus {
        let r = c.call(
            &Request::Attach {
                addr,
                len,
                policy: AttachPolicy::Default,
            },
            &[],
        );
        assert_eq!(
            code(&r),
            Some(ErrorCode::BadRange),
            "{addr:#x}+{len:#x}: {r:?}"
        );
    }
    assert_eq!(code(&c.read(99, 0, 1)), Some(ErrorCode::NoSuchMirror));
    let base = map(2, 1);
    let Response::Attached { mirror_id } = c.call(
        &Request::Attach {
            addr: base as u64,
            len: 2 * P as u64,
            policy: AttachPolicy::Default,
        },
        &[],
    ) else {
        panic!()
    };
    // Mirrors may overlap (two devices of one buffer): each has its own notifier.
    assert!(matches!(
        c.call(
            &Request::Attach {
                addr: base as u64 + P as u64,
                len: P as u64,
                policy: AttachPolicy::Default,
            },
            &[]
        ),
        Response::Attached { .. }
    ));
    assert_eq!(
        code(&c.read(mirror_id, P as u64, P as u32 + 1)),
        Some(ErrorCode::BadRange)
    );
    assert_eq!(
        code(&c.read(mirror_id, 0, MAX_READ as u32 + 1)),
        Some(ErrorCode::BadRange)
    );
    // Another client cannot list clients unless root or the owner: we are root, so allowed.
    assert!(matches!(
        c.call(&Request::ListClients, &[]),
        Response::Clients { .. }
    ));
    // Garbage closes only this session; a second client carries on.
    let mut other = Raw::connect(&d.path);
    other.hello();
    nix::sys::socket::send(
        c.sock.as_raw_fd(),
        b"garbage!",
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    let f = proto::recv(c.sock.as_fd(), &mut c.buf).unwrap();
    assert!(matches!(
        Response::decode(f.header.msg_type, &f.payload, 0),
        Ok(Response::Error {
            code: ErrorCode::BadMessage,
            ..
        })
    ));
    assert!(matches!(
        proto::recv(c.sock.as_fd(), &mut c.buf),
        Err(proto::SocketError::Closed)
    ));
    assert!(matches!(
        other.call(&Request::Status, &[]),
        Response::StatusReport { .. }
    ));
    // SAFETY: our own mapping.
    unsafe { libc::munmap(base.cast(), 2 * P) };
}

fn arb_request(base: u64) -> impl Strategy<Value = Request> {
    let addr = prop_oneof![Just(base), Just(base + P as u64), any::<u64>(), Just(0u64)];
    let len = prop_oneof![Just(P as u64), Just(4 * P as u64), any::<u64>(), Just(0u64)];
    prop_oneof![
        (any::<u16>(), any::<u16>(), "[a-z]{0,8}").prop_map(|(min_version, max_version, name)| {
            Request::Hello {
                min_version,
                max_version,
                name,
            }
        }),
        any::<bool>().prop_map(|p| Request::Bind {
            flags: if p {
                BindFlags::UFFD_PRIVILEGED
            } else {
                BindFlags::empty()
            }
        }),
        (
            addr,
            len,
            prop_oneof![
                Just(AttachPolicy::Default),
                Just(AttachPolicy::Strict),
                Just(AttachPolicy::Periodic { period_ms: 1 }),
                Just(AttachPolicy::Periodic { period_ms: 10 }),
            ]
        )
            .prop_map(|(addr, len, policy)| Request::Attach { addr, len, policy }),
        (0u64..4).prop_map(|mirror_id| Request::Sync { mirror_id }),
        prop_oneof![Just(std::process::id() as i32), any::<i32>()]
            .prop_map(|pid| Request::SyncPid { pid }),
        (0u64..4).prop_map(|mirror_id| Request::Detach { mirror_id }),
        (
            0u64..4,
            prop_oneof![Just(0u64), any::<u64>(), Just(P as u64)],
            prop_oneof![Just(1u32), any::<u32>()]
        )
            .prop_map(|(mirror_id, offset, len)| Request::Read {
                mirror_id,
                offset,
                len
            }),
        (
            0u64..4,
            any::<u64>(),
            prop_oneof![Just(P as u64), any::<u64>()]
        )
            .prop_map(|(mirror_id, offset, len)| Request::Populate {
                mirror_id,
                offset,
                len
            }),
        Just(Request::ClientStats),
        Just(Request::Status),
        Just(Request::ListClients),
        prop_oneof![
            Just(0),
            Just(-1),
            Just(std::process::id() as i32),
            any::<i32>()
        ]
        .prop_map(|pid| Request::ListMirrors { pid }),
        (
            prop_oneof![Just(std::process::id() as i32), any::<i32>()],
            prop_oneof![Just(base), Just(base + 3 * P as u64), any::<u64>()],
            prop_oneof![Just(16u32), Just(MAX_READ as u32 + 1), any::<u32>()]
        )
            .prop_map(|(pid, addr, len)| Request::Peek { pid, addr, len }),
        (
            prop_oneof![Just(base), Just(base + P as u64), any::<u64>()],
            prop_oneof![Just(P as u64), Just(8 * P as u64), any::<u64>()],
            0usize..6,
            any::<bool>()
        )
            .prop_map(|(addr, len, k, nb)| Request::Invalidate {
                pid: std::process::id() as i32,
                addr,
                len,
                event: EventKind::ALL[k],
                flags: if nb {
                    InvalidateFlags::NON_BLOCKING
                } else {
                    InvalidateFlags::empty()
                },
            }),
        (0i32..2, 0u32..128).prop_map(|(p, events)| Request::Trace {
            pid: p * std::process::id() as i32,
            events,
        }),
    ]
}

/// Which fds ride with a Bind: 0 none, 1 the right ones, 2 wrong ones.
fn fds_for(kind: u8) -> Vec<OwnedFd> {
    match kind {
        1 => vec![
            raw_uffd(),
            std::fs::File::open("/proc/self/mem").unwrap().into(),
        ],
        2 => vec![
            std::fs::File::open("/dev/null").unwrap().into(),
            std::fs::File::open("/proc/self/maps").unwrap().into(),
        ],
        _ => Vec::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of requests, valid or not, gets an answer (never a panic), mirrors stay
    /// within quota, and the client can be released cleanly afterwards.
    #[test]
    fn the_handler_answers_every_request_sequence(reqs in proptest::collection::vec((any::<u8>(), any::<u8>()), 1..24)) {
        static DAEMON: std::sync::OnceLock<std::sync::Mutex<Daemon>> = std::sync::OnceLock::new();
        let d = DAEMON.get_or_init(|| std::sync::Mutex::new(Daemon::start())).lock().unwrap();
        let core = &d.core;
        let base = map(8, 7);
        let (a, _b) = nix::sys::socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let pid = std::process::id() as i32;
        let s = Arc::new(Session::new(u64::MAX >> 2, Peer { pid, uid: 0, gid: 0 }, crate::sys::pidfd_open(pid).unwrap(), a, super::outbox::Outbox::new(64, 1 << 20), std::time::Duration::ZERO));
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        for (seed, fdkind) in reqs {
            let req = arb_request(base as u64).new_tree(&mut runner).unwrap().current();
            let req = if seed % 3 == 0 { Request::Hello { min_version: 1, max_version: VERSION, name: "p".into() } } else { req };
            let fds = if matches!(req, Request::Bind { .. }) { fds_for(fdkind % 3) } else { Vec::new() };
            let r = handler::handle(core, &s, 1, req, fds);
            if let Response::Counters { entries } = &r {
                prop_assert!(!entries.is_empty());
            }
            if let Some(w) = s.watched() {
                prop_assert!(w.len() <= core.cfg.limits.quotas.mirrors as usize);
            }
        }
        core.release(&s);
        if let Some(w) = s.watched() {
            prop_assert_eq!(w.len(), 0);
            prop_assert_eq!(w.device().page_table_len(), 0);
        }
        // SAFETY: our own mapping.
        unsafe { libc::munmap(base.cast(), 8 * P) };
    }
}

/// Answers of many requests in flight, written by the workers while the session loop
/// flushes the queue of a client that reads in bursts: every answer arrives. (A flush that
/// emptied the queue and then, racing a worker that had just queued an answer, turned the
/// watch for room off left that answer unsent until the client's next request.)
#[test]
fn every_answer_of_a_bursty_reader_arrives() {
    crate::test_support::needs_full_userfaultfd!();
    let d = Daemon::start();
    let mut c = Raw::connect(&d.path);
    c.hello();
    assert!(matches!(c.bind(), Response::Bound { .. }));
    let base = map(16, 3);
    let id = match c.call(
        &Request::Attach {
            addr: base as u64,
            len: (16 * P) as u64,
            policy: AttachPolicy::Default,
        },
        &[],
    ) {
        Response::Attached { mirror_id } => mirror_id,
        r => panic!("{r:?}"),
    };
    // Never wait forever for an answer: a lost one fails the test.
    nix::sys::socket::setsockopt(
        &c.sock,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(20, 0),
    )
    .unwrap();
    let inflight = Config::default().limits.quotas.inflight as u64;
    for round in 0..200u64 {
        for k in 0..inflight {
            let req = Request::Read {
                mirror_id: id,
                offset: (k % 2) * P as u64,
                len: MAX_READ as u32,
            };
            proto::send(
                c.sock.as_fd(),
                req.msg_type(),
                0,
                round * 100 + k + 1_000,
                &req.encode_payload(),
                &[],
            )
            .unwrap();
        }
        // Let the answers back up in the socket before reading them all.
        std::thread::sleep(std::time::Duration::from_micros(200 * (round % 5)));
        for _ in 0..inflight {
            let f = proto::recv(c.sock.as_fd(), &mut c.buf)
                .unwrap_or_else(|e| panic!("round {round}: an answer never came: {e}"));
            let r = Response::decode(f.header.msg_type, &f.payload, 0).unwrap();
            assert_eq!(data(r).len(), MAX_READ);
        }
    }
    // SAFETY: our own mapping.
    unsafe { libc::munmap(base.cast(), 16 * P) };
}
