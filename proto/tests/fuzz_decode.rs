//! Decoder fuzzing: `Header::decode`, `Request::decode` and `Response::decode` fed random
//! bytes and valid encodings of every message variant, then mutated (bit flips, truncations,
//! extensions, insertions, length fields set to extremes, wrong types, wrong fd counts).
//!
//! Checked for every input:
//! - nothing panics;
//! - decoding allocates in proportion to the bytes it was given (a counting global
//!   allocator measures the peak of live heap bytes during each call; a header allocates
//!   nothing at all);
//! - what decodes re-encodes to exactly the bytes it came from (so no decoded size, length
//!   or count exceeds what the input carried), and only with the fds its type takes;
//! - `decode(encode(x)) == x` for every valid message.
//!
//! `PROPTEST_CASES` scales the random properties (default: see [`cases`]); the systematic
//! ones (every length field at every position set to every extreme) always run in full.

#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use memshadow_proto::{
    AccessPath, AttachPolicy, BindFlags, ClientInfo, DecodeError, DirtyBackend, ErrorCode,
    EventKind, Header, InvalidateFlags, InvalidationReport, Limits, MirrorInfo, Request, Response,
    SyncReport, FLAG_MORE, HEADER_LEN, MAX_FDS, MAX_LIST, MAX_NAME, MAX_PAYLOAD, MAX_PERIOD_MS,
    MAX_READ, MAX_VALUE, MIN_VERSION, VERSION,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// A global allocator that counts this thread's live heap bytes and their peak.

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(n: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get().saturating_add(n);
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn note_free(n: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(n)));
}

// SAFETY: every method forwards to the system allocator with the caller's arguments
// unchanged and only updates thread-local counters (which never allocate) besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is System's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (i.e. by System) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        note_free(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by System with `layout`; the caller upholds the rest.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note_free(layout.size());
            note_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the most heap bytes it held live at once.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, PEAK.with(Cell::get) - base)
}

/// The most a decode of `len` payload bytes may hold: the in-memory form of a list element
/// is at most 12 times its smallest wire form (`(String, String)`: 48 bytes for 4 wire
/// bytes), plus the strings' own bytes, plus a little slack.
fn allowed_heap(len: usize) -> usize {
    16 * len + 256
}

// ---------------------------------------------------------------------------------------
// Checks shared by every property.

/// What the `fds` rule of each type is.
fn fds_ok_for(req: &Request, fds: usize) -> bool {
    match req {
        Request::Bind { .. } => (2..=5).contains(&fds),
        _ => fds == 0,
    }
}

/// Decodes `payload` as a request and as a response of `msg_type` with `fds` fds and checks
/// every invariant; returns what decoded (for the caller's own checks).
fn check_decode(
    msg_type: u16,
    payload: &[u8],
    fds: usize,
) -> (Result<Request, DecodeError>, Result<Response, DecodeError>) {
    let (req, heap) = peak_during(|| Request::decode(msg_type, payload, fds));
    assert!(
        heap <= allowed_heap(payload.len()),
        "Request::decode({msg_type:#06x}, {} bytes) held {heap} heap bytes",
        payload.len()
    );
    if let Ok(r) = &req {
        assert_eq!(r.msg_type(), msg_type, "{r:?}");
        assert!(fds_ok_for(r, fds), "{r:?} accepted with {fds} fds");
        assert_eq!(
            r.encode_payload(),
            payload,
            "{r:?} does not re-encode to its bytes"
        );
    }
    let (resp, heap) = peak_during(|| Response::decode(msg_type, payload, fds));
    assert!(
        heap <= allowed_heap(payload.len()),
        "Response::decode({msg_type:#06x}, {} bytes) held {heap} heap bytes",
        payload.len()
    );
    if let Ok(r) = &resp {
        assert_eq!(r.msg_type(), msg_type, "{r:?}");
        assert_eq!(fds, 0, "{r:?} accepted with {fds} fds");
        assert_eq!(
            r.encode_payload(),
            payload,
            "{r:?} does not re-encode to its bytes"
        );
    }
    assert!(
        req.is_err() || resp.is_err(),
        "{msg_type:#06x} decoded in both directions"
    );
    (req, resp)
}

/// [`check_decode`], for callers that need only the checks.
fn check(msg_type: u16, payload: &[u8], fds: usize) {
    let _ = check_decode(msg_type, payload, fds);
}

/// Decodes `bytes` as a whole received message's header and checks every invariant.
fn check_header(bytes: &[u8]) -> Option<Header> {
    let (h, heap) = peak_during(|| Header::decode(bytes));
    assert_eq!(heap, 0, "Header::decode allocated");
    let h = h.ok()?;
    assert_eq!(h.encode()[..], bytes[..HEADER_LEN], "{h:?}");
    assert!((MIN_VERSION..=VERSION).contains(&h.version), "{h:?}");
    assert_eq!(h.flags & !FLAG_MORE, 0);
    assert!(usize::from(h.fd_count) <= MAX_FDS);
    assert!(h.payload_len as usize <= MAX_PAYLOAD);
    assert_eq!(bytes.len(), HEADER_LEN + h.payload_len as usize);
    Some(h)
}

// ---------------------------------------------------------------------------------------
// Mutations.

/// One change to a byte string.
#[derive(Debug, Clone)]
enum Mutation {
    /// Flip bit `.1` of the byte at `.0` (mod length).
    Flip(usize, u8),
    /// Overwrite 1, 2, 4 or 8 bytes at `.0` (mod length) with `.1`'s low bytes: a length,
    /// count or enum field set to an extreme.
    Set(usize, u8, u64),
    /// Keep only the first `.0 % (len + 1)` bytes.
    Truncate(usize),
    /// Append these bytes.
    Extend(Vec<u8>),
    /// Insert bytes at `.0` (mod length + 1).
    Insert(usize, Vec<u8>),
    /// Delete up to `.1` bytes at `.0` (mod length).
    Delete(usize, usize),
}

impl Mutation {
    fn apply(&self, b: &mut Vec<u8>) {
        match self {
            Mutation::Flip(at, bit) if !b.is_empty() => {
                let i = at % b.len();
                b[i] ^= 1 << (bit % 8);
            }
            Mutation::Set(at, width, v) if !b.is_empty() => {
                let i = at % b.len();
                let w = [1usize, 2, 4, 8][usize::from(*width % 4)];
                for (k, byte) in v.to_le_bytes().iter().take(w).enumerate() {
                    if i + k < b.len() {
                        b[i + k] = *byte;
                    }
                }
            }
            Mutation::Truncate(n) => b.truncate(n % (b.len() + 1)),
            Mutation::Extend(x) => b.extend_from_slice(x),
            Mutation::Insert(at, x) => {
                let i = at % (b.len() + 1);
                b.splice(i..i, x.iter().copied());
            }
            Mutation::Delete(at, n) if !b.is_empty() => {
                let i = at % b.len();
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            _ => {}
        }
    }
}

/// Values a length, count or enum field is worth trying.
fn extreme() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(u64::from(u8::MAX)),
        Just(u64::from(u16::MAX)),
        Just(u64::from(u16::MAX) + 1),
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        Just(MAX_NAME as u64),
        Just(MAX_NAME as u64 + 1),
        Just(MAX_VALUE as u64 + 1),
        Just(MAX_LIST as u64),
        Just(MAX_LIST as u64 + 1),
        Just(MAX_READ as u64),
        Just(MAX_READ as u64 + 1),
        Just(MAX_PAYLOAD as u64),
        Just(MAX_PAYLOAD as u64 + 1),
        Just(1024),
        Just(1025),
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Flip(a, b)),
        (any::<usize>(), any::<u8>(), extreme()).prop_map(|(a, w, v)| Mutation::Set(a, w, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Extend),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(a, x)| Mutation::Insert(a, x)),
        (any::<usize>(), 1usize..16).prop_map(|(a, n)| Mutation::Delete(a, n)),
    ]
}

/// A message type near the real ones, or any.
fn msg_type() -> impl Strategy<Value = u16> {
    prop_oneof![
        0u16..0x30,
        0x8000u16..0x8030,
        Just(0x80ffu16),
        Just(0x0fffu16),
        Just(0xffffu16),
        any::<u16>(),
    ]
}

/// An fd count: mostly plausible, sometimes absurd.
fn fd_count() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..=MAX_FDS + 2, 1 => Just(usize::MAX), 1 => any::<usize>()]
}

// ---------------------------------------------------------------------------------------
// Valid messages of every variant.

/// A step of splitmix64: cheap pseudo-random bytes for large inputs (proptest's own
/// per-byte generation is slow for 64 KiB).
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` pseudo-random bytes from `seed`.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = splitmix(x);
            x as u8
        })
        .collect()
}

/// `s` cut to at most `max` bytes, at a char boundary (what the encoder would send).
fn cut(mut s: String, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9._, -]{0,20}",
        1 => any::<String>(),
        1 => "[a-z]{60,70}",
    ]
    .prop_map(move |s| cut(s, max))
}

fn event_kind() -> impl Strategy<Value = EventKind> {
    proptest::sample::select(EventKind::ALL.to_vec())
}

fn attach_policy() -> impl Strategy<Value = AttachPolicy> {
    prop_oneof![
        Just(AttachPolicy::Default),
        Just(AttachPolicy::Manual),
        Just(AttachPolicy::Lazy),
        Just(AttachPolicy::Strict),
        (1u32..=MAX_PERIOD_MS).prop_map(|p| AttachPolicy::Periodic { period_ms: p }),
    ]
}

/// Any valid request and an fd count it accepts.
fn request() -> impl Strategy<Value = (Request, usize)> {
    let plain = |r: BoxedStrategy<Request>| r.prop_map(|r| (r, 0usize));
    prop_oneof![
        plain(
            (any::<u16>(), any::<u16>(), text(MAX_NAME))
                .prop_map(|(min_version, max_version, name)| Request::Hello {
                    min_version,
                    max_version,
                    name
                })
                .boxed()
        ),
        (any::<bool>(), 2usize..=5).prop_map(|(p, n)| (
            Request::Bind {
                flags: if p {
                    BindFlags::UFFD_PRIVILEGED
                } else {
                    BindFlags::empty()
                }
            },
            n
        )),
        plain(
            (any::<u64>(), any::<u64>(), attach_policy())
                .prop_map(|(addr, len, policy)| Request::Attach { addr, len, policy })
                .boxed()
        ),
        plain(
            any::<u64>()
                .prop_map(|mirror_id| Request::Detach { mirror_id })
                .boxed()
        ),
        plain(
            (any::<u64>(), any::<u64>(), any::<u32>())
                .prop_map(|(mirror_id, offset, len)| Request::Read {
                    mirror_id,
                    offset,
                    len
                })
                .boxed()
        ),
        plain(
            (any::<u64>(), any::<u64>(), any::<u64>())
                .prop_map(|(mirror_id, offset, len)| Request::Populate {
                    mirror_id,
                    offset,
                    len
                })
                .boxed()
        ),
        plain(Just(Request::ClientStats).boxed()),
        plain(Just(Request::Status).boxed()),
        plain(Just(Request::ListClients).boxed()),
        plain(
            any::<i32>()
                .prop_map(|pid| Request::ListMirrors { pid })
                .boxed()
        ),
        plain(
            (any::<i32>(), any::<u64>(), any::<u32>())
                .prop_map(|(pid, addr, len)| Request::Peek { pid, addr, len })
                .boxed()
        ),
        plain(
            (
                any::<i32>(),
                any::<u64>(),
                any::<u64>(),
                event_kind(),
                any::<bool>()
            )
                .prop_map(|(pid, addr, len, event, nb)| Request::Invalidate {
                    pid,
                    addr,
                    len,
                    event,
                    flags: if nb {
                        InvalidateFlags::NON_BLOCKING
                    } else {
                        InvalidateFlags::empty()
                    }
                })
                .boxed()
        ),
        plain(
            (any::<i32>(), any::<u32>())
                .prop_map(|(pid, events)| Request::Trace { pid, events })
                .boxed()
        ),
        plain(
            any::<u64>()
                .prop_map(|mirror_id| Request::Sync { mirror_id })
                .boxed()
        ),
        plain(
            any::<i32>()
                .prop_map(|pid| Request::SyncPid { pid })
                .boxed()
        ),
    ]
}

fn invalidation_report() -> impl Strategy<Value = InvalidationReport> {
    (
        (any::<i32>(), event_kind(), any::<u64>(), any::<u64>()),
        (any::<u32>(), any::<bool>()),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(
                (pid, event, start, end),
                (notifiers, would_block),
                (start_ns, finish_ns, flushes_queued, flushes_coalesced),
            )| InvalidationReport {
                pid,
                event,
                start,
                end,
                notifiers,
                would_block,
                start_ns,
                finish_ns,
                flushes_queued,
                flushes_coalesced,
            },
        )
}

fn sync_report() -> impl Strategy<Value = SyncReport> {
    (
        proptest::sample::select(vec![
            DirtyBackend::PagemapScan,
            DirtyBackend::SoftDirty,
            DirtyBackend::UffdWp,
        ]),
        any::<u32>(),
        any::<[u64; 5]>(),
    )
        .prop_map(|(backend, mirrors, v)| SyncReport {
            backend,
            mirrors,
            pages_scanned: v[0],
            pages_dirty: v[1],
            regions: v[2],
            scan_ns: v[3],
            invalidate_ns: v[4],
        })
}

fn client_info() -> impl Strategy<Value = ClientInfo> {
    (
        (any::<u64>(), any::<i32>(), any::<u32>(), any::<bool>()),
        (any::<u32>(), any::<u64>(), any::<u64>(), text(MAX_NAME)),
        (any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |((id, pid, uid, bound), (mirrors, shadow_bytes, events, comm), (faults, inv))| {
                ClientInfo {
                    id,
                    pid,
                    uid,
                    bound,
                    mirrors,
                    shadow_bytes,
                    events,
                    comm,
                    faults,
                    invalidations: inv,
                }
            },
        )
}

fn mirror_info() -> impl Strategy<Value = MirrorInfo> {
    (
        any::<[u64; 4]>(),
        any::<i32>(),
        any::<u64>(),
        text(MAX_NAME),
    )
        .prop_map(|(v, pid, seq, state)| MirrorInfo {
            id: v[0],
            addr: v[1],
            len: v[2],
            pages: v[3],
            pid,
            seq,
            state,
        })
}

/// Any valid response that fits one message.
fn response() -> impl Strategy<Value = Response> {
    let list = |n: usize| proptest::collection::vec((text(MAX_NAME), any::<u64>()), 0..n);
    prop_oneof![
        (
            any::<u16>(),
            text(MAX_NAME),
            any::<u32>(),
            (any::<[u32; 4]>(), any::<u16>(), any::<u64>(), any::<u32>())
        )
            .prop_map(
                |(version, daemon_version, page_size, (a, max_fds, sb, c))| {
                    Response::HelloAck {
                        version,
                        daemon_version,
                        page_size,
                        limits: Limits {
                            max_payload: a[0],
                            max_fds,
                            max_read: a[1],
                            shadow_bytes: sb,
                            mirrors: a[2],
                            inflight: a[3],
                            clients_per_uid: c,
                        },
                    }
                }
            ),
        (
            proptest::sample::select(vec![AccessPath::ProcessVm, AccessPath::MemFd]),
            any::<u64>()
        )
            .prop_map(|(access, uffd_features)| Response::Bound {
                access,
                uffd_features
            }),
        any::<u64>().prop_map(|mirror_id| Response::Attached { mirror_id }),
        Just(Response::Detached),
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            (0..=MAX_READ, any::<u64>()).prop_map(|(n, seed)| noise(n, seed)),
        ]
        .prop_map(|bytes| Response::Data { bytes }),
        any::<u64>().prop_map(|pages| Response::Populated { pages }),
        prop_oneof![
            list(8),
            // Up to the list limit, with names short enough to fit one message.
            (0..=MAX_LIST, any::<u64>()).prop_map(|(n, seed)| {
                let mut x = seed;
                (0..n)
                    .map(|i| {
                        x = splitmix(x);
                        let name = "abcdefghijklmnopqrstuvwxyz0123456789._-"[..(x % 40) as usize]
                            .to_owned();
                        (name, x.rotate_left(i as u32 % 64))
                    })
                    .collect()
            }),
        ]
        .prop_map(|entries| Response::Counters { entries }),
        proptest::collection::vec(client_info(), 0..8)
            .prop_map(|clients| Response::Clients { clients }),
        proptest::collection::vec(mirror_info(), 0..8)
            .prop_map(|mirrors| Response::Mirrors { mirrors }),
        (
            proptest::collection::vec((text(MAX_NAME), text(MAX_VALUE)), 0..8),
            list(8)
        )
            .prop_map(|(info, counters)| Response::StatusReport { info, counters }),
        invalidation_report().prop_map(|report| Response::Invalidated { report }),
        Just(Response::TraceStarted),
        (any::<u64>(), invalidation_report())
            .prop_map(|(dropped, report)| Response::TraceEvent { dropped, report }),
        sync_report().prop_map(|report| Response::Synced { report }),
        (any::<u16>(), text(1024)).prop_map(|(c, message)| Response::Error {
            code: ErrorCode::from_code(c),
            message
        }),
    ]
}

/// One request and one response of every variant, lists with two entries: the seeds of the
/// systematic mutations.
fn samples() -> (Vec<(Request, usize)>, Vec<Response>) {
    let report = InvalidationReport {
        pid: 42,
        event: EventKind::Clear,
        start: 0x1000,
        end: 0x3000,
        notifiers: 1,
        would_block: true,
        start_ns: 1,
        finish_ns: 2,
        flushes_queued: 3,
        flushes_coalesced: 4,
    };
    let reqs = vec![
        (
            Request::Hello {
                min_version: 1,
                max_version: 1,
                name: "fuzz".into(),
            },
            0,
        ),
        (
            Request::Bind {
                flags: BindFlags::UFFD_PRIVILEGED,
            },
            3,
        ),
        (
            Request::Attach {
                addr: 0x7f00_0000_0000,
                len: 0x4000,
                policy: AttachPolicy::Periodic { period_ms: 250 },
            },
            0,
        ),
        (Request::Detach { mirror_id: 1 }, 0),
        (
            Request::Read {
                mirror_id: 1,
                offset: 0,
                len: 4096,
            },
            0,
        ),
        (
            Request::Populate {
                mirror_id: 1,
                offset: 0,
                len: 4096,
            },
            0,
        ),
        (Request::ClientStats, 0),
        (Request::Status, 0),
        (Request::ListClients, 0),
        (Request::ListMirrors { pid: -1 }, 0),
        (
            Request::Peek {
                pid: 7,
                addr: 0x1000,
                len: 16,
            },
            0,
        ),
        (
            Request::Invalidate {
                pid: 7,
                addr: 0x1000,
                len: 4096,
                event: EventKind::Unmap,
                flags: InvalidateFlags::NON_BLOCKING,
            },
            0,
        ),
        (Request::Trace { pid: 7, events: 3 }, 0),
        (Request::Sync { mirror_id: 0 }, 0),
        (Request::SyncPid { pid: 7 }, 0),
    ];
    let resps = vec![
        Response::HelloAck {
            version: 1,
            daemon_version: "0.1.0".into(),
            page_size: 4096,
            limits: Limits {
                max_payload: 65536,
                max_fds: 4,
                max_read: 61440,
                shadow_bytes: 1 << 30,
                mirrors: 8,
                inflight: 4,
                clients_per_uid: 64,
            },
        },
        Response::Bound {
            access: AccessPath::MemFd,
            uffd_features: 0x3ff,
        },
        Response::Attached { mirror_id: 3 },
        Response::Detached,
        Response::Data {
            bytes: vec![1, 2, 3],
        },
        Response::Populated { pages: 2 },
        Response::Counters {
            entries: vec![("a".into(), 1), ("bc".into(), 2)],
        },
        Response::Clients {
            clients: vec![
                ClientInfo {
                    id: 1,
                    pid: 2,
                    uid: 3,
                    bound: true,
                    mirrors: 4,
                    shadow_bytes: 5,
                    events: 6,
                    comm: "x".into(),
                    faults: 7,
                    invalidations: 8,
                };
                2
            ],
        },
        Response::Mirrors {
            mirrors: vec![
                MirrorInfo {
                    id: 1,
                    addr: 0x1000,
                    len: 0x1000,
                    pages: 1,
                    pid: 2,
                    seq: 3,
                    state: "active".into(),
                };
                2
            ],
        },
        Response::StatusReport {
            info: vec![("k".into(), "v".into()), ("k2".into(), "v2".into())],
            counters: vec![("c".into(), 1), ("d".into(), 2)],
        },
        Response::Invalidated { report },
        Response::TraceStarted,
        Response::TraceEvent { dropped: 1, report },
        Response::Synced {
            report: SyncReport {
                backend: DirtyBackend::SoftDirty,
                mirrors: 1,
                pages_scanned: 2,
                pages_dirty: 3,
                regions: 4,
                scan_ns: 5,
                invalidate_ns: 6,
            },
        },
        Response::error(ErrorCode::BadRange, "bad range"),
    ];
    (reqs, resps)
}

/// Cases of the random properties: `PROPTEST_CASES` if set, else `default`.
fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases: n,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(cases(2048))]

    /// Every valid request decodes to itself, with any fd count its type takes and with no
    /// other; its header too.
    #[test]
    fn valid_requests_round_trip((req, fds) in request(), id in any::<u64>(), more in any::<bool>()) {
        let payload = req.encode_payload();
        prop_assert!(payload.len() <= MAX_PAYLOAD);
        let (decoded, _) = check_decode(req.msg_type(), &payload, fds);
        prop_assert_eq!(decoded, Ok(req.clone()));
        for wrong in [0, 1, 2, 3, 4, 5, usize::MAX] {
            if !fds_ok_for(&req, wrong) {
                let (r, _) = check_decode(req.msg_type(), &payload, wrong);
                let is_fd_count_error = matches!(r, Err(DecodeError::FdCount { .. }));
                prop_assert!(is_fd_count_error, "{:?} with {} fds: {:?}", req, wrong, r);
            }
        }
        let h = Header {
            version: VERSION,
            msg_type: req.msg_type(),
            flags: if more { FLAG_MORE } else { 0 },
            fd_count: fds as u16,
            payload_len: payload.len() as u32,
            request_id: id,
        };
        let mut wire = h.encode().to_vec();
        wire.extend_from_slice(&payload);
        prop_assert_eq!(check_header(&wire), Some(h));
    }

    /// Every valid response decodes to itself.
    #[test]
    fn valid_responses_round_trip(resp in response()) {
        let payload = resp.encode_payload();
        prop_assert!(payload.len() <= MAX_PAYLOAD);
        let (_, decoded) = check_decode(resp.msg_type(), &payload, 0);
        prop_assert_eq!(decoded, Ok(resp.clone()));
        let (_, with_fd) = check_decode(resp.msg_type(), &payload, 1);
        let is_fd_count_error = matches!(with_fd, Err(DecodeError::FdCount { .. }));
        prop_assert!(is_fd_count_error);
    }

    /// Valid requests, mutated, under any type and fd count: the invariants hold.
    #[test]
    fn mutated_requests_hold_the_invariants(
        (req, _) in request(),
        muts in proptest::collection::vec(mutation(), 1..6),
        ty in prop_oneof![3 => Just(None), 1 => msg_type().prop_map(Some)],
        fds in fd_count(),
    ) {
        let mut payload = req.encode_payload();
        for m in &muts {
            m.apply(&mut payload);
        }
        check(ty.unwrap_or(req.msg_type()), &payload, fds);
    }

    /// Valid responses, mutated, under any type and fd count: the invariants hold.
    #[test]
    fn mutated_responses_hold_the_invariants(
        resp in response(),
        muts in proptest::collection::vec(mutation(), 1..6),
        ty in prop_oneof![3 => Just(None), 1 => msg_type().prop_map(Some)],
        fds in prop_oneof![4 => Just(0usize), 1 => fd_count()],
    ) {
        let mut payload = resp.encode_payload();
        for m in &muts {
            m.apply(&mut payload);
        }
        check(ty.unwrap_or(resp.msg_type()), &payload, fds);
    }

    /// Random bytes of any type: the invariants hold.
    #[test]
    fn random_bytes_hold_the_invariants(
        ty in msg_type(),
        payload in prop_oneof![
            4 => proptest::collection::vec(any::<u8>(), 0..128),
            1 => (0..=MAX_PAYLOAD + 16, any::<u64>()).prop_map(|(n, seed)| noise(n, seed)),
        ],
        fds in fd_count(),
    ) {
        check(ty, &payload, fds);
    }

    /// Headers: valid ones with a payload, mutated, and random bytes.
    #[test]
    fn headers_hold_the_invariants(
        h in (msg_type(), any::<u16>(), 0u16..=MAX_FDS as u16 + 2, any::<u64>()).prop_map(
            |(msg_type, flags, fd_count, request_id)| Header {
                version: VERSION,
                msg_type,
                flags: flags & FLAG_MORE,
                fd_count: fd_count.min(MAX_FDS as u16),
                payload_len: 0,
                request_id,
            }
        ),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        muts in proptest::collection::vec(mutation(), 0..4),
        random in proptest::collection::vec(any::<u8>(), 0..48),
    ) {
        let h = Header { payload_len: payload.len() as u32, ..h };
        let mut wire = h.encode().to_vec();
        wire.extend_from_slice(&payload);
        if muts.is_empty() {
            prop_assert_eq!(check_header(&wire), Some(h));
        }
        for m in &muts {
            m.apply(&mut wire);
        }
        check_header(&wire);
        check_header(&random);
        let mut magic = b"MSHD".to_vec();
        magic.extend_from_slice(&random);
        check_header(&magic);
    }
}

/// Every u8/u16/u32/u64-wide window of every sample's payload (and header) set to every
/// extreme value, every truncation, and extensions: the invariants hold.
#[test]
fn every_field_at_every_extreme() {
    let extremes: Vec<u64> = vec![
        0,
        1,
        2,
        0x7f,
        0x80,
        0xff,
        0x100,
        MAX_NAME as u64,
        MAX_NAME as u64 + 1,
        MAX_VALUE as u64 + 1,
        1024,
        1025,
        MAX_LIST as u64 + 1,
        0x7fff,
        0xffff,
        0x1_0000,
        MAX_READ as u64,
        MAX_READ as u64 + 1,
        MAX_PAYLOAD as u64,
        0x7fff_ffff,
        0xffff_ffff,
        u64::MAX,
    ];
    let (reqs, resps) = samples();
    let mut seeds: Vec<(u16, Vec<u8>, usize)> = reqs
        .iter()
        .map(|(r, fds)| (r.msg_type(), r.encode_payload(), *fds))
        .collect();
    seeds.extend(resps.iter().map(|r| (r.msg_type(), r.encode_payload(), 0)));
    let mut n = 0usize;
    for (ty, payload, fds) in &seeds {
        for at in 0..payload.len() {
            for width in 0..4u8 {
                for v in &extremes {
                    let mut p = payload.clone();
                    Mutation::Set(at, width, *v).apply(&mut p);
                    check(*ty, &p, *fds);
                    n += 1;
                }
            }
        }
        for len in 0..payload.len() {
            check(*ty, &payload[..len], *fds);
        }
        for extra in [&[0u8][..], &[0xff], &[0; 8], &[0xff; 8]] {
            let mut p = payload.clone();
            p.extend_from_slice(extra);
            check(*ty, &p, *fds);
        }
        // Wrong fd counts of every kind.
        for f in 0..=MAX_FDS + 2 {
            check(*ty, payload, f);
        }
        // The header of the message with each of its fields at each extreme.
        let h = Header {
            version: VERSION,
            msg_type: *ty,
            flags: 0,
            fd_count: *fds as u16,
            payload_len: payload.len() as u32,
            request_id: 9,
        };
        let mut wire = h.encode().to_vec();
        wire.extend_from_slice(payload);
        assert_eq!(check_header(&wire), Some(h));
        for at in 0..HEADER_LEN {
            for width in 0..4u8 {
                for v in &extremes {
                    let mut w = wire.clone();
                    Mutation::Set(at, width, *v).apply(&mut w);
                    check_header(&w);
                }
            }
        }
        for len in 0..wire.len() {
            check_header(&wire[..len]);
        }
    }
    assert!(n > 10_000, "only {n} mutations tried");
}

/// The allocation meter works (else every bound above would pass vacuously).
#[test]
fn the_allocation_meter_sees_a_reservation() {
    let (v, heap) = peak_during(|| Vec::<u8>::with_capacity(1 << 20));
    assert!(heap >= 1 << 20, "{heap}");
    drop(v);
    let (_, heap) = peak_during(|| Header::decode(&[0; HEADER_LEN]));
    assert_eq!(heap, 0);
}

/// Lying list counts: a short payload whose count says `MAX_LIST` (or more) elements never
/// makes the decoder reserve room for them.
#[test]
fn lying_counts_do_not_reserve() {
    let (_, resps) = samples();
    for r in resps.iter().filter(|r| {
        matches!(
            r,
            Response::Counters { .. }
                | Response::Clients { .. }
                | Response::Mirrors { .. }
                | Response::StatusReport { .. }
        )
    }) {
        for count in [MAX_LIST as u32, MAX_LIST as u32 + 1, u32::MAX] {
            for tail in [0usize, 1, 10, 100] {
                let mut p = count.to_le_bytes().to_vec();
                p.extend(std::iter::repeat_n(0u8, tail));
                let (_, resp) = check_decode(r.msg_type(), &p, 0);
                assert!(resp.is_err(), "{count} elements in {tail} bytes decoded");
            }
        }
    }
    // Data: a u32 length of up to 4 GiB with 4 bytes behind it.
    for len in [MAX_READ as u32, MAX_READ as u32 + 1, u32::MAX] {
        let mut p = len.to_le_bytes().to_vec();
        p.extend_from_slice(&[1, 2, 3, 4]);
        let ty = Response::Data { bytes: vec![] }.msg_type();
        let (_, resp) = check_decode(ty, &p, 0);
        assert!(resp.is_err());
    }
}

/// Every list response, however long, goes out in pieces that each fit one message
/// (`into_pieces`), and the pieces put together (`absorb`) give the list back whole: no
/// entry is cut. (Found by this fuzzer: 1024 clients with 15-byte names encoded to 71 680
/// bytes, past `MAX_PAYLOAD`, and the encoder panicked in a debug build.)
#[test]
fn every_list_response_goes_out_in_pieces_that_fit() {
    let client = ClientInfo {
        id: 1,
        pid: 100_000,
        uid: 0,
        bound: true,
        mirrors: 1,
        shadow_bytes: 4096,
        events: 0,
        comm: "longest-comm-15".into(),
        faults: 0,
        invalidations: 0,
    };
    let long_name = "n".repeat(MAX_NAME);
    for whole in [
        Response::Clients {
            clients: vec![client; 3 * MAX_LIST + 7],
        },
        Response::Counters {
            entries: vec![(long_name.clone(), 7); 2 * MAX_LIST],
        },
        Response::StatusReport {
            info: vec![(long_name.clone(), "v".repeat(MAX_VALUE)); 700],
            counters: vec![(long_name, 1); 1500],
        },
        Response::Clients { clients: vec![] },
    ] {
        let mut back: Option<Response> = None;
        for p in whole.clone().into_pieces() {
            let bytes = p.encode_payload();
            assert!(
                bytes.len() <= MAX_PAYLOAD,
                "a piece of {} bytes",
                bytes.len()
            );
            let p = Response::decode(p.msg_type(), &bytes, 0).unwrap();
            match &mut back {
                None => back = Some(p),
                Some(b) => assert!(b.absorb(p)),
            }
        }
        assert_eq!(back.as_ref(), Some(&whole));
    }
}
