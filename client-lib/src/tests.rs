//! Unit tests against a fake daemon on a socketpair.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::fake_daemon;
use memshadow_proto::{EventKind, InvalidationReport};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;

/// Tests that create userfaultfds hold this, so the one that counts this process's
/// userfaultfds sees none of theirs.
static UFFDS: Mutex<()> = Mutex::new(());

fn uffd_test() -> std::sync::MutexGuard<'static, ()> {
    UFFDS.lock().unwrap_or_else(PoisonError::into_inner)
}

#[test]
fn both_uffd_flavours_can_be_created() {
    let _uffds = uffd_test();
    for fd in [
        create_uffd().unwrap(),
        create_uffd_with(UFFD_USER_MODE_ONLY).unwrap(),
    ] {
        let t = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(t.to_str(), Some("anon_inode:[userfaultfd]"));
    }
}

#[test]
fn error_codes_map_to_variants() {
    let m = |c| Error::from_response(c, "x".into());
    assert!(matches!(m(ErrorCode::NotMirrored), Error::NotMirrored(_)));
    assert!(matches!(
        m(ErrorCode::QuotaExceeded),
        Error::QuotaExceeded(_)
    ));
    assert!(matches!(
        m(ErrorCode::AlreadyWatched),
        Error::AlreadyWatched(_)
    ));
    assert!(matches!(
        m(ErrorCode::ProtocolVersion),
        Error::ProtocolVersion(_)
    ));
    assert!(matches!(m(ErrorCode::ShuttingDown), Error::DaemonGone));
    assert!(matches!(m(ErrorCode::BadFd), Error::Protocol(_)));
    assert!(matches!(m(ErrorCode::Other(77)), Error::Daemon { .. }));
    assert!(matches!(m(ErrorCode::NoSuchGrant), Error::NoSuchGrant(_)));
    assert!(matches!(m(ErrorCode::Evicted), Error::Evicted(_)));
    assert_eq!(m(ErrorCode::Evicted).raw_os_error(), None);
}

/// `Mirror::grant` sends `Grant` and returns the token; an ordinary call whose answer brings
/// fds refuses it and keeps none of them open.
#[test]
fn a_grant_is_a_token_and_an_answer_with_fds_is_refused() {
    let _uffds = uffd_test();
    const LEAK: &str = "memshadow-test-grant-fds";
    let grants = Arc::new(AtomicUsize::new(0));
    let (a, daemon) = fake_daemon::spawn_with_fds(Limits::default(), {
        let grants = Arc::clone(&grants);
        move |req, _| match *req {
            Request::Attach { .. } => Some((Response::Attached { mirror_id: 9 }, vec![])),
            Request::Grant { mirror_id: 9 } if grants.fetch_add(1, Ordering::SeqCst) == 0 => {
                Some((
                    Response::Granted {
                        token: 1 << 100 | 5,
                    },
                    vec![],
                ))
            }
            Request::Grant { .. } => {
                let fds = (0..5)
                    .map(|_| {
                        nix::sys::memfd::memfd_create(LEAK, nix::sys::memfd::MFdFlags::empty())
                            .unwrap()
                    })
                    .collect();
                Some((
                    Response::EngineAttached {
                        engine_id: 1,
                        mirror_id: 9,
                        addr: 0,
                        len: 4096,
                        shadow_bytes: 4096,
                        page_size: 4096,
                    },
                    fds,
                ))
            }
            Request::Detach { .. } => Some((Response::Detached, vec![])),
            _ => None,
        }
    });
    let c = Client::builder().socket_fd(a).connect().unwrap();
    let m = c.attach(0x10000 as *const u8, 4096).unwrap();
    assert_eq!(m.grant().unwrap(), 1 << 100 | 5);
    assert!(matches!(m.grant(), Err(Error::Protocol(_))));
    drop((m, c));
    daemon.join().unwrap();
    let open = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains(LEAK))
        .count();
    assert_eq!(open, 0, "the refused answer's fds are closed");
}

fn uffds_held() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_str() == Some("anon_inode:[userfaultfd]"))
        .count()
}

/// A fake daemon: answers hello, bind (checking the fds), attach, reads and detach, then
/// hangs up.
#[test]
fn talks_the_protocol_splits_reads_and_keeps_no_uffd() {
    let _uffds = uffd_test();
    let before = uffds_held();
    let reads = Arc::new(AtomicUsize::new(0));
    let limits = Limits {
        max_read: MAX_READ as u32,
        ..Limits::default()
    };
    let (a, daemon) = fake_daemon::spawn(limits, {
        let reads = Arc::clone(&reads);
        move |req, fds| match *req {
            Request::Bind { .. } => {
                assert_eq!(fds.len(), 5, "uffd, mem, maps, pagemap, clear_refs");
                let t =
                    std::fs::read_link(format!("/proc/self/fd/{}", fds[0].as_raw_fd())).unwrap();
                assert_eq!(t.to_str(), Some("anon_inode:[userfaultfd]"));
                None
            }
            Request::Attach { .. } => Some(Response::Attached { mirror_id: 5 }),
            Request::Read { len, offset, .. } => {
                reads.fetch_add(1, Ordering::SeqCst);
                Some(if offset >= 1 << 20 {
                    Response::error(ErrorCode::NotMirrored, "gone")
                } else {
                    Response::Data {
                        bytes: vec![offset as u8; len as usize],
                    }
                })
            }
            Request::Detach { .. } => Some(Response::Detached),
            // A read of several messages populates first (one fault per missing run).
            Request::Populate { .. } => Some(Response::Populated { pages: 32 }),
            _ => None,
        }
    });
    let c = Client::builder().socket_fd(a).connect().unwrap();
    assert_eq!(
        uffds_held(),
        before,
        "the client keeps no copy of its uffd (G6)"
    );
    assert_eq!(c.access_path(), Some(AccessPath::MemFd));
    let m = c.attach(0x10000 as *const u8, 2 << 20).unwrap();
    let mut buf = vec![0u8; MAX_READ * 2 + 10];
    m.read(0, &mut buf).unwrap();
    assert_eq!(
        buf[MAX_READ], MAX_READ as u8,
        "the second chunk came from offset MAX_READ"
    );
    assert!(matches!(
        m.read(1 << 20, &mut buf[..1]),
        Err(Error::NotMirrored(_))
    ));
    assert!(matches!(
        m.read(2 << 20, &mut buf[..1]),
        Err(Error::BadRange(_))
    ));
    assert!(matches!(
        c.attach(0x10001 as *const u8, 4096),
        Err(Error::BadRange(_))
    ));
    m.detach().unwrap();
    drop(c);
    daemon.join().unwrap();
    assert_eq!(reads.load(Ordering::SeqCst), 4);
}

#[test]
fn a_vanished_daemon_is_daemon_gone() {
    let (a, b) = fake_daemon::seqpacket_pair();
    drop(b);
    assert!(matches!(
        Client::builder().socket_fd(a).connect_control(),
        Err(Error::DaemonGone)
    ));
}

/// The bind flag says which uffd flavour was created; attach policies and syncs go on the
/// wire as the protocol defines them.
#[test]
fn bind_flag_policies_and_sync_go_on_the_wire() {
    let _uffds = uffd_test();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a, daemon) = fake_daemon::spawn(Limits::default(), {
        let seen = Arc::clone(&seen);
        move |req, _| {
            seen.lock().unwrap().push(req.clone());
            match *req {
                Request::Attach { policy, .. } => Some(Response::Attached {
                    mirror_id: u64::from(policy.flags()),
                }),
                Request::Sync { mirror_id } => Some(Response::Synced {
                    report: SyncReport {
                        backend: DirtyBackend::PagemapScan,
                        mirrors: mirror_id as u32,
                        pages_scanned: 8,
                        pages_dirty: 1,
                        regions: 1,
                        scan_ns: 10,
                        invalidate_ns: 20,
                    },
                }),
                Request::SyncPid { .. } => Some(Response::error(
                    ErrorCode::Unsupported,
                    "dirty tracking is off",
                )),
                Request::Detach { .. } => Some(Response::Detached),
                _ => None,
            }
        }
    });
    let c = Client::builder().socket_fd(a).connect().unwrap();
    let strict = c
        .attach_with(0x10000 as *const u8, 4096, Policy::Strict)
        .unwrap();
    assert_eq!(strict.id(), u64::from(AttachPolicy::Strict.flags()));
    let periodic = c
        .attach_with(
            0x20000 as *const u8,
            4096,
            Policy::Periodic(Duration::from_millis(250)),
        )
        .unwrap();
    assert_eq!(
        AttachPolicy::from_flags(periodic.id() as u32),
        Ok(AttachPolicy::Periodic { period_ms: 250 })
    );
    let plain = c.attach(0x30000 as *const u8, 4096).unwrap();
    assert_eq!(plain.id(), 0, "the daemon's default");
    let r = strict.sync().unwrap();
    assert_eq!(r.mirrors as u64, strict.id(), "Sync names the mirror");
    assert_eq!(r.backend, DirtyBackend::PagemapScan);
    assert_eq!(c.sync().unwrap().mirrors, 0, "0: every mirror");
    assert!(matches!(
        c.control().sync_pid(42),
        Err(Error::Unsupported(_))
    ));
    drop((strict, periodic, plain, c));
    daemon.join().unwrap();
    let seen = seen.lock().unwrap();
    let privileged = create_uffd_with(0).is_ok();
    assert!(seen.contains(&Request::Bind {
        flags: if privileged {
            BindFlags::UFFD_PRIVILEGED
        } else {
            BindFlags::empty()
        }
    }));
    assert!(seen.contains(&Request::SyncPid { pid: 42 }));
}

/// A list longer than one message arrives in pieces (FLAG_MORE on all but the last); the
/// library hands back the whole list, in order, and the next call still gets its own answer.
#[test]
fn a_long_list_is_put_back_together_from_its_pieces() {
    let clients: Vec<ClientInfo> = (0..3000)
        .map(|i| ClientInfo {
            id: i,
            pid: 1000 + i as i32,
            uid: 0,
            bound: true,
            mirrors: 1,
            shadow_bytes: 4096,
            events: 0,
            comm: format!("client-{i}"),
            faults: 0,
            invalidations: 0,
        })
        .collect();
    assert!(
        Response::Clients {
            clients: clients.clone()
        }
        .into_pieces()
        .len()
            > 3,
        "the list must not fit in one message for this test to mean anything"
    );
    let sent = clients.clone();
    let (a, daemon) = fake_daemon::spawn(Limits::default(), move |req, _| match req {
        Request::ListClients => Some(Response::Clients {
            clients: sent.clone(),
        }),
        Request::Status => Some(Response::error(ErrorCode::Internal, "after the list")),
        _ => None,
    });
    let c = Client::builder().socket_fd(a).connect_control().unwrap();
    assert_eq!(c.list_clients().unwrap(), clients);
    assert!(matches!(c.status(), Err(Error::Daemon { .. })));
    drop(c);
    daemon.join().unwrap();
}

#[test]
fn the_errno_behind_an_error_is_found_among_its_causes() {
    let io = |n| std::io::Error::from_raw_os_error(n);
    let connect = Error::Connect {
        path: "/x".into(),
        source: nix::Error::ECONNREFUSED,
    };
    assert_eq!(connect.raw_os_error(), Some(libc::ECONNREFUSED));
    assert_eq!(
        Error::Uffd(io(libc::EPERM)).raw_os_error(),
        Some(libc::EPERM)
    );
    assert_eq!(
        Error::Proc("/proc/self/mem", io(libc::EACCES)).raw_os_error(),
        Some(libc::EACCES)
    );
    // Two causes down: Error::Socket -> SocketError::Io -> Errno.
    let socket = Error::Socket(SocketError::Io(nix::Error::EMSGSIZE));
    assert_eq!(socket.raw_os_error(), Some(libc::EMSGSIZE));
    // No system call failed behind these.
    assert_eq!(Error::Socket(SocketError::Closed).raw_os_error(), None);
    assert_eq!(Error::NotMirrored("x".into()).raw_os_error(), None);
    assert_eq!(Error::DaemonGone.raw_os_error(), None);
}

#[test]
fn targets_are_the_protocols_pids() {
    assert_eq!(Target::Me.mirrors_pid().unwrap(), 0);
    assert_eq!(Target::All.mirrors_pid().unwrap(), -1);
    assert_eq!(Target::Pid(42).mirrors_pid().unwrap(), 42);
    assert_eq!(
        Target::Me.trace_pid().unwrap(),
        std::process::id() as i32,
        "a trace of this process"
    );
    assert_eq!(Target::All.trace_pid().unwrap(), 0);
    assert_eq!(Target::Pid(42).trace_pid().unwrap(), 42);
    // A pid that would read as one of the special values on the wire is no client's.
    for p in [0, -1, i32::MIN] {
        assert!(matches!(
            Target::Pid(p).mirrors_pid(),
            Err(Error::NoSuchClient(_))
        ));
        assert!(matches!(
            Target::Pid(p).trace_pid(),
            Err(Error::NoSuchClient(_))
        ));
    }
}

/// A fake daemon listening at a path: answers `Hello` and `Status`, starts a trace on
/// `Trace` and sends its one record when `release` gets a message; `hellos` are the names
/// its connections gave, in order.
struct TraceDaemon {
    path: PathBuf,
    hellos: Arc<Mutex<Vec<String>>>,
    release: mpsc::Sender<()>,
}

impl TraceDaemon {
    fn start(tag: &str) -> TraceDaemon {
        use nix::sys::socket::{accept, bind, listen, Backlog};
        let dir = std::env::temp_dir().join(format!("memshadow-lib-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.sock");
        let l = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(l.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&l, Backlog::new(4).unwrap()).unwrap();
        let hellos = Arc::new(Mutex::new(Vec::new()));
        let (release, released) = mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        let seen = Arc::clone(&hellos);
        std::thread::spawn(move || {
            while let Ok(fd) = accept(l.as_raw_fd()) {
                // SAFETY: `accept` just returned this fd; nothing else owns it.
                let conn = unsafe { OwnedFd::from_raw_fd(fd) };
                let (seen, released) = (Arc::clone(&seen), Arc::clone(&released));
                std::thread::spawn(move || serve_trace(&conn, &seen, &released));
            }
        });
        TraceDaemon {
            path,
            hellos,
            release,
        }
    }
}

fn serve_trace(conn: &OwnedFd, seen: &Mutex<Vec<String>>, released: &Mutex<mpsc::Receiver<()>>) {
    let send = |id: u64, flags: u16, r: &Response| {
        proto::send(
            conn.as_fd(),
            r.msg_type(),
            flags,
            id,
            &r.encode_payload(),
            &[],
        )
        .is_ok()
    };
    let mut buf = Vec::new();
    while let Ok(f) = proto::recv(conn.as_fd(), &mut buf) {
        let id = f.header.request_id;
        let ok = match Request::decode(f.header.msg_type, &f.payload, f.fds.len()).unwrap() {
            Request::Hello { name, .. } => {
                seen.lock().unwrap().push(name);
                send(
                    id,
                    0,
                    &Response::HelloAck {
                        version: VERSION,
                        daemon_version: "fake".into(),
                        page_size: 4096,
                        limits: Limits::default(),
                    },
                )
            }
            Request::Status => send(
                id,
                0,
                &Response::StatusReport {
                    info: vec![],
                    counters: vec![("server.clients".into(), 2)],
                },
            ),
            Request::Trace { pid, .. } => {
                assert_eq!(pid, 0, "Target::All");
                let record = Response::TraceEvent {
                    dropped: 3,
                    report: InvalidationReport {
                        pid: 77,
                        event: EventKind::Unmap,
                        start: 0x1000,
                        end: 0x3000,
                        notifiers: 1,
                        would_block: false,
                        start_ns: 1,
                        finish_ns: 2,
                        flushes_queued: 0,
                        flushes_coalesced: 0,
                    },
                };
                send(id, 0, &Response::TraceStarted)
                    && released.lock().unwrap().recv().is_ok()
                    && send(id, proto::FLAG_MORE, &record)
            }
            _ => send(id, 0, &Response::error(ErrorCode::Internal, "unexpected")),
        };
        if !ok {
            return;
        }
    }
}

/// A trace waiting for its next record holds up no other call of the session it came
/// from: it has a connection of its own, opened under the session's name.
#[test]
fn a_trace_waits_on_a_connection_of_its_own() {
    let d = TraceDaemon::start("trace");
    let control = Client::builder()
        .socket(&d.path)
        .name("tracer")
        .connect_control()
        .unwrap();
    let mut trace = control.trace(Target::All, 0).unwrap();
    let waiting = std::thread::spawn(move || trace.next_record());
    // The trace thread is (about to be) blocked in next_record; a status must not wait
    // for it. Asked on another thread so a regression fails rather than hangs.
    let (tx, rx) = mpsc::channel();
    let asker = control.clone();
    std::thread::spawn(move || tx.send(asker.status().map(|s| s.counter("server.clients"))));
    let status = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("status waited for the trace");
    assert_eq!(status.unwrap(), Some(2));
    d.release.send(()).unwrap();
    let rec = waiting.join().unwrap().unwrap();
    assert_eq!((rec.dropped, rec.report.pid), (3, 77));
    assert_eq!(
        *d.hellos.lock().unwrap(),
        ["tracer", "tracer"],
        "the session, then the trace's own connection"
    );
    let _ = std::fs::remove_dir_all(d.path.parent().unwrap());
}

/// A session on a socket handed over has no path to open a trace's connection at.
#[test]
fn a_trace_needs_a_path() {
    let (a, daemon) = fake_daemon::spawn(Limits::default(), |_, _| None);
    let control = Client::builder().socket_fd(a).connect_control().unwrap();
    assert!(matches!(
        control.trace(Target::All, 0),
        Err(Error::Unsupported(_))
    ));
    drop(control);
    daemon.join().unwrap();
}

/// A name the protocol cannot carry whole is refused, not cut.
#[test]
fn a_session_name_too_long_is_refused_before_anything_is_sent() {
    let (a, daemon) = fake_daemon::spawn(Limits::default(), |_, _| None);
    let long = "n".repeat(proto::MAX_NAME + 1);
    let r = Client::builder().socket_fd(a).name(long).connect_control();
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    daemon.join().unwrap();
}

/// A daemon that answers every request with answers to other requests gets an error, not a
/// caller waiting for good.
#[test]
fn answers_to_no_request_end_the_wait() {
    let (client, daemon) = fake_daemon::seqpacket_pair();
    let server = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut sent = 0usize;
        while let Ok(f) = proto::recv(daemon.as_fd(), &mut buf) {
            let (id, r) = match Request::decode(f.header.msg_type, &f.payload, 0).unwrap() {
                Request::Hello { .. } => (
                    f.header.request_id,
                    Response::HelloAck {
                        version: VERSION,
                        daemon_version: "fake".into(),
                        page_size: 4096,
                        limits: Limits::default(),
                    },
                ),
                _ => (f.header.request_id + 1000, Response::Detached),
            };
            let n = if matches!(r, Response::HelloAck { .. }) {
                1
            } else {
                2 * MAX_SKIPPED
            };
            for _ in 0..n {
                let msg = r.encode_payload();
                if proto::send(daemon.as_fd(), r.msg_type(), 0, id, &msg, &[]).is_err() {
                    return sent;
                }
                sent += 1;
            }
        }
        sent
    });
    let ctl = Client::builder()
        .socket_fd(client)
        .connect_control()
        .unwrap();
    match ctl.status() {
        Err(Error::Protocol(m)) => assert!(m.contains("answers to no request"), "{m}"),
        r => panic!("{r:?}"),
    }
    drop(ctl);
    assert!(server.join().unwrap() > MAX_SKIPPED);
}

/// With a timeout, a daemon that never answers fails the call instead of holding it; a
/// daemon of this process's own user passes the own-daemon check.
#[test]
fn a_silent_daemon_fails_a_call_with_a_timeout() {
    let (client, daemon) = fake_daemon::seqpacket_pair();
    let t = std::time::Instant::now();
    let r = Client::builder()
        .socket_fd(client)
        .timeout(Duration::from_millis(100))
        .own_daemon_only(true)
        .connect_control();
    assert!(matches!(r, Err(Error::Socket(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    drop(daemon);
}
