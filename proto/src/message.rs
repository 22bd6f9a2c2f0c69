//! The typed messages: requests a client sends, responses and errors the daemon returns.
//!
//! Requests have types `0x0001..`, responses `0x8001..`; a response carries the
//! `request_id` of the request it answers. Decoding checks the payload field by field
//! ([`crate::codec::Reader`]) and the number of fds the message type allows.

use crate::codec::{CodecError, Reader, Writer};
use crate::header::MAX_PAYLOAD;

/// Longest name (client name, counter name, version string) on the wire.
pub const MAX_NAME: usize = 64;
/// Largest device read one `Read` request may ask for (its answer must fit one message).
pub const MAX_READ: usize = 60 * 1024;
/// Most entries of a list response (counters, clients, mirrors).
pub const MAX_LIST: usize = 1024;
/// Longest value of a status line (a socket path fits).
pub const MAX_VALUE: usize = 256;
/// `Invalidate` flag: the invalidation may not block (a refusal is reported as `EAGAIN`).
pub const INVALIDATE_NON_BLOCKING: u8 = 1;
/// `Bind` flag: the uffd was created without `UFFD_USER_MODE_ONLY`, so the kernel's own
/// accesses to write-protected pages wait for the daemon instead of failing with `EFAULT`
/// (DESIGN.md §6); only then may the daemon track writes with synchronous write-protect
/// faults. The claim affects only the client that makes it.
pub const BIND_UFFD_PRIVILEGED: u32 = 1;
/// `Attach` flags: the bits that choose the collection policy of written pages
/// ([`AttachPolicy`]).
pub const ATTACH_POLICY_MASK: u32 = 0x3;
/// `Attach` flags: the period of [`AttachPolicy::Periodic`], in ms, sits above this bit.
pub const ATTACH_PERIOD_SHIFT: u32 = 8;
/// Longest period [`AttachPolicy::Periodic`] can carry (24 bits of ms, about 4.6 h).
pub const MAX_PERIOD_MS: u32 = (1 << (32 - ATTACH_PERIOD_SHIFT)) - 1;

/// When the daemon collects the written pages of an attached range (issue 7), carried in
/// the `flags` of `Attach`: bits 0-1 the kind, bits 8-31 the period of `Periodic` in ms,
/// bits 2-7 zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachPolicy {
    /// The daemon's default (`--dirty-policy`).
    Default,
    /// Only on an explicit `Sync`.
    Manual,
    /// Before each device read of the range (the read's pages are scanned first).
    Strict,
    /// On a timer of the daemon, every `period_ms` ms (1..=[`MAX_PERIOD_MS`]).
    Periodic {
        /// The period in ms.
        period_ms: u32,
    },
}

impl AttachPolicy {
    /// The `Attach` flags that carry it (a period beyond [`MAX_PERIOD_MS`] is clamped).
    pub fn flags(self) -> u32 {
        match self {
            AttachPolicy::Default => 0,
            AttachPolicy::Manual => 1,
            AttachPolicy::Strict => 2,
            AttachPolicy::Periodic { period_ms } => {
                3 | (period_ms.clamp(1, MAX_PERIOD_MS) << ATTACH_PERIOD_SHIFT)
            }
        }
    }

    /// Reads the policy out of `Attach` flags; `Err` says what is wrong with them.
    pub fn from_flags(flags: u32) -> Result<AttachPolicy, String> {
        let period = flags >> ATTACH_PERIOD_SHIFT;
        if flags & !(ATTACH_POLICY_MASK | (MAX_PERIOD_MS << ATTACH_PERIOD_SHIFT)) != 0 {
            return Err(format!("unknown attach flags {flags:#x}"));
        }
        match (flags & ATTACH_POLICY_MASK, period) {
            (0, 0) => Ok(AttachPolicy::Default),
            (1, 0) => Ok(AttachPolicy::Manual),
            (2, 0) => Ok(AttachPolicy::Strict),
            (3, p) if p > 0 => Ok(AttachPolicy::Periodic { period_ms: p }),
            (3, _) => Err("a periodic policy needs a period of at least 1 ms".into()),
            _ => Err(format!(
                "attach flags {flags:#x} carry a period without the periodic policy"
            )),
        }
    }
}

/// The dirty-tracking back end that served a `Sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyBackend {
    /// `UFFD_FEATURE_WP_ASYNC` + the `PAGEMAP_SCAN` ioctl.
    PagemapScan,
    /// `clear_refs` + pagemap bit 55.
    SoftDirty,
    /// Synchronous uffd write-protect faults.
    UffdWp,
}

impl DirtyBackend {
    fn code(self) -> u8 {
        match self {
            DirtyBackend::PagemapScan => 1,
            DirtyBackend::SoftDirty => 2,
            DirtyBackend::UffdWp => 3,
        }
    }

    fn from_code(c: u8) -> Result<DirtyBackend, CodecError> {
        match c {
            1 => Ok(DirtyBackend::PagemapScan),
            2 => Ok(DirtyBackend::SoftDirty),
            3 => Ok(DirtyBackend::UffdWp),
            value => Err(CodecError::BadValue {
                field: "backend",
                value: value.into(),
            }),
        }
    }

    /// The name used by flags, status and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            DirtyBackend::PagemapScan => "pagemap-scan",
            DirtyBackend::SoftDirty => "soft-dirty",
            DirtyBackend::UffdWp => "uffd-wp",
        }
    }
}

/// What one `Sync` (or `SyncPid`) did: written pages found and invalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncReport {
    /// The back end that found them.
    pub backend: DirtyBackend,
    /// Mirrors whose ranges were collected.
    pub mirrors: u32,
    /// Pages whose written state was looked at (0 for `uffd-wp`, which needs no scan: its
    /// write faults invalidate as they happen).
    pub pages_scanned: u64,
    /// Pages found written and invalidated (for `uffd-wp`: pages whose write faults were
    /// handled since the previous sync of the client).
    pub pages_dirty: u64,
    /// Runs of written pages (one invalidation each).
    pub regions: u64,
    /// Time spent finding the written pages and re-arming them, in ns.
    pub scan_ns: u64,
    /// Time spent invalidating them (start and finish passes), in ns.
    pub invalidate_ns: u64,
}

impl SyncReport {
    #[cfg(test)]
    const WIRE_LEN: usize = 1 + 4 + 8 * 5;

    fn encode(&self, w: &mut Writer) {
        w.u8(self.backend.code())
            .u32(self.mirrors)
            .u64(self.pages_scanned)
            .u64(self.pages_dirty)
            .u64(self.regions)
            .u64(self.scan_ns)
            .u64(self.invalidate_ns);
    }

    fn decode(r: &mut Reader<'_>) -> Result<SyncReport, CodecError> {
        Ok(SyncReport {
            backend: DirtyBackend::from_code(r.u8("backend")?)?,
            mirrors: r.u32("mirrors")?,
            pages_scanned: r.u64("pages_scanned")?,
            pages_dirty: r.u64("pages_dirty")?,
            regions: r.u64("regions")?,
            scan_ns: r.u64("scan_ns")?,
            invalidate_ns: r.u64("invalidate_ns")?,
        })
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A message type this version does not know.
    #[error("unknown message type {0:#06x}")]
    UnknownType(u16),
    /// A message type that is valid, but not in this direction.
    #[error("message type {0:#06x} is not valid in this direction")]
    WrongDirection(u16),
    /// The wrong number of fds for this message type.
    #[error("{got} fds attached, message type {msg_type:#06x} takes {want}")]
    FdCount {
        /// The type.
        msg_type: u16,
        /// What it takes.
        want: &'static str,
        /// What came.
        got: usize,
    },
    /// A malformed payload.
    #[error("malformed {what} payload")]
    Payload {
        /// The message.
        what: &'static str,
        /// The field-level cause.
        #[source]
        source: CodecError,
    },
}

/// The daemon's limits and this client's quotas, stated in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Largest payload of a message.
    pub max_payload: u32,
    /// Most fds per message.
    pub max_fds: u16,
    /// Largest `Read`.
    pub max_read: u32,
    /// Shadow bytes this client may have mirrored at once.
    pub shadow_bytes: u64,
    /// Ranges this client may have attached at once.
    pub mirrors: u32,
    /// Requests this client may have in flight at once.
    pub inflight: u32,
    /// Clients one uid may have connected at once.
    pub clients_per_uid: u32,
}

/// How the daemon reads a bound client's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessPath {
    /// `process_vm_readv` on the peer's pid (the daemon is allowed to and it is faster).
    ProcessVm,
    /// `preadv` of the `/proc/self/mem` fd the client handed over.
    MemFd,
}

impl AccessPath {
    fn code(self) -> u8 {
        match self {
            AccessPath::ProcessVm => 0,
            AccessPath::MemFd => 1,
        }
    }
    fn from_code(c: u8) -> Result<AccessPath, CodecError> {
        match c {
            0 => Ok(AccessPath::ProcessVm),
            1 => Ok(AccessPath::MemFd),
            value => Err(CodecError::BadValue {
                field: "access",
                value: value.into(),
            }),
        }
    }
    /// A short name for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessPath::ProcessVm => "process_vm_readv",
            AccessPath::MemFd => "mem-fd",
        }
    }
}

/// One connected client, as `ListClients` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The daemon's id for the session.
    pub id: u64,
    /// Peer pid (from `SO_PEERCRED`).
    pub pid: i32,
    /// Peer uid.
    pub uid: u32,
    /// Whether a uffd is bound.
    pub bound: bool,
    /// Attached ranges.
    pub mirrors: u32,
    /// Shadow bytes in use.
    pub shadow_bytes: u64,
    /// uffd events handled.
    pub events: u64,
    /// The peer's command name (`/proc/PID/comm`), empty if unknown.
    pub comm: String,
    /// Device faults.
    pub faults: u64,
    /// Invalidations of its shadow (any kind).
    pub invalidations: u64,
}

/// One attached range, as `ListMirrors` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorInfo {
    /// Mirror id.
    pub id: u64,
    /// Current first byte (follows `mremap`).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Pages currently mirrored in the shadow.
    pub pages: u64,
    /// Pid of the client that attached it.
    pub pid: i32,
    /// The notifier's sequence (odd; advances with every invalidation that hits it).
    pub seq: u64,
    /// The notifier's state and what is left of the range (e.g. `active`, `active, 1 hole`,
    /// `pending-remove`, `gone`).
    pub state: String,
}

/// An invalidation kind on the wire (the notifier core's events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// `munmap`, the source of an `mremap`, an `mmap` over the range.
    Unmap,
    /// `madvise(DONTNEED/FREE/REMOVE)`.
    Clear,
    /// `mprotect` of a whole VMA.
    ProtectionVma,
    /// Protection of individual pages.
    ProtectionPage,
    /// Written pages found by dirty tracking.
    SoftDirty,
    /// The client is gone.
    Release,
}

impl EventKind {
    /// Every kind, in wire-code order (code = index + 1).
    pub const ALL: [EventKind; 6] = [
        EventKind::Unmap,
        EventKind::Clear,
        EventKind::ProtectionVma,
        EventKind::ProtectionPage,
        EventKind::SoftDirty,
        EventKind::Release,
    ];

    /// The wire value (1..=6).
    pub fn code(self) -> u8 {
        EventKind::ALL
            .iter()
            .position(|k| *k == self)
            .map_or(0, |i| i as u8 + 1)
    }

    /// From the wire value.
    pub fn from_code(c: u8) -> Option<EventKind> {
        EventKind::ALL.get(usize::from(c).checked_sub(1)?).copied()
    }

    /// The name used by the CLI, logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Unmap => "unmap",
            EventKind::Clear => "clear",
            EventKind::ProtectionVma => "protection-vma",
            EventKind::ProtectionPage => "protection-page",
            EventKind::SoftDirty => "soft-dirty",
            EventKind::Release => "release",
        }
    }

    /// Parses a name of [`EventKind::as_str`].
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn decode(r: &mut Reader<'_>) -> Result<EventKind, CodecError> {
        let c = r.u8("event")?;
        EventKind::from_code(c).ok_or(CodecError::BadValue {
            field: "event",
            value: c.into(),
        })
    }
}

/// What one invalidation did: the answer to `Invalidate` and the body of a trace record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidationReport {
    /// Pid of the client whose shadow was invalidated.
    pub pid: i32,
    /// The kind.
    pub event: EventKind,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Notifiers whose callback ran.
    pub notifiers: u32,
    /// A non-blockable invalidation was refused (`EAGAIN`); what had started was finished.
    pub would_block: bool,
    /// Time of the start pass (tree walk, PTE zaps, flushes queued), in ns.
    pub start_ns: u64,
    /// Time of the finish pass (fence waits, shadow unmapped), in ns.
    pub finish_ns: u64,
    /// TLB flushes queued on the engines while it ran (device-wide).
    pub flushes_queued: u64,
    /// Queued flushes the engines coalesced while it ran (device-wide).
    pub flushes_coalesced: u64,
}

impl InvalidationReport {
    #[cfg(test)]
    const WIRE_LEN: usize = 4 + 1 + 8 + 8 + 4 + 1 + 8 * 4;

    fn encode(&self, w: &mut Writer) {
        w.i32(self.pid)
            .u8(self.event.code())
            .u64(self.start)
            .u64(self.end)
            .u32(self.notifiers)
            .u8(self.would_block.into())
            .u64(self.start_ns)
            .u64(self.finish_ns)
            .u64(self.flushes_queued)
            .u64(self.flushes_coalesced);
    }

    fn decode(r: &mut Reader<'_>) -> Result<InvalidationReport, CodecError> {
        Ok(InvalidationReport {
            pid: r.i32("pid")?,
            event: EventKind::decode(r)?,
            start: r.u64("start")?,
            end: r.u64("end")?,
            notifiers: r.u32("notifiers")?,
            would_block: bool_field(r, "would_block")?,
            start_ns: r.u64("start_ns")?,
            finish_ns: r.u64("finish_ns")?,
            flushes_queued: r.u64("flushes_queued")?,
            flushes_coalesced: r.u64("flushes_coalesced")?,
        })
    }
}

fn bool_field(r: &mut Reader<'_>, field: &'static str) -> Result<bool, CodecError> {
    match r.u8(field)? {
        0 => Ok(false),
        1 => Ok(true),
        value => Err(CodecError::BadValue {
            field,
            value: value.into(),
        }),
    }
}

/// A request, client → daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// First message of a session: the versions this client speaks and who it is.
    Hello {
        /// Oldest version spoken.
        min_version: u16,
        /// Newest version spoken.
        max_version: u16,
        /// A name for logs (program name).
        name: String,
    },
    /// Hands over the client's uffd and its `/proc/self/mem` fd (opened for reading), then
    /// (protocol 2) its `/proc/self/maps` fd, then optionally its `/proc/self/pagemap` fd
    /// (for reading) and its `/proc/self/clear_refs` fd (for writing), in that order, as 2
    /// to 5 `SCM_RIGHTS` fds (protocol 1: uffd, mem and optionally pagemap).
    Bind {
        /// [`BIND_UFFD_PRIVILEGED`] or 0; other bits must be 0.
        flags: u32,
    },
    /// Mirror `addr..addr+len` of the client's memory.
    Attach {
        /// First byte (page aligned).
        addr: u64,
        /// Length (page aligned, > 0).
        len: u64,
        /// The collection policy of written pages ([`AttachPolicy::flags`]); 0 takes the
        /// daemon's default.
        flags: u32,
    },
    /// Stop mirroring a range.
    Detach {
        /// Which.
        mirror_id: u64,
    },
    /// A device read of `len` bytes at `offset` into a mirror, served by an engine.
    Read {
        /// Which mirror.
        mirror_id: u64,
        /// Byte offset into the mirror.
        offset: u64,
        /// Bytes, at most [`MAX_READ`].
        len: u32,
    },
    /// Fault `offset..offset+len` of a mirror into the shadow without returning data.
    Populate {
        /// Which mirror.
        mirror_id: u64,
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// This session's counters.
    ClientStats,
    /// The daemon's settings and counters.
    Status,
    /// Every connected client (root or the daemon's owner only).
    ListClients,
    /// Mirrors of this session (`pid` 0), of the client with that pid, or of every client
    /// (`pid` -1); another client's only for root or the daemon's owner (G7).
    ListMirrors {
        /// Whose.
        pid: i32,
    },
    /// A device read of another client's shadow at a client address (root or owner only).
    Peek {
        /// The client.
        pid: i32,
        /// First byte (client virtual address).
        addr: u64,
        /// Bytes, at most [`MAX_READ`].
        len: u32,
    },
    /// Injects an invalidation of a client's range, as if its address space had changed
    /// (root, the daemon's owner, or the client itself).
    Invalidate {
        /// The client.
        pid: i32,
        /// First byte.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// The kind to report.
        event: EventKind,
        /// [`INVALIDATE_NON_BLOCKING`] or 0.
        flags: u8,
    },
    /// Subscribes this session to a live stream of invalidations: answered by `TraceStarted`,
    /// then one `TraceEvent` per invalidation, all with `FLAG_MORE` and this request's id,
    /// until the session closes. Other clients' events only for root or the daemon's owner.
    Trace {
        /// Only this client's (0: every client the caller may see).
        pid: i32,
        /// Bit `code - 1` set for each [`EventKind`] wanted; 0 means all.
        events: u32,
    },
    /// Collects the pages this client wrote in a mirror (or in every mirror, `mirror_id`
    /// 0) and invalidates them, so the next device read returns the new bytes.
    Sync {
        /// Which mirror (0: all of this session's).
        mirror_id: u64,
    },
    /// `Sync` of every mirror of the client with that pid (root, the daemon's owner, or
    /// the client itself; `memshadowctl sync --pid`).
    SyncPid {
        /// The client.
        pid: i32,
    },
}

/// A response, daemon → client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Answer to `Hello`.
    HelloAck {
        /// The version chosen for the session.
        version: u16,
        /// The daemon's build version.
        daemon_version: String,
        /// The daemon's page size.
        page_size: u32,
        /// Limits and quotas.
        limits: Limits,
    },
    /// Answer to `Bind`.
    Bound {
        /// How the daemon will read memory.
        access: AccessPath,
        /// Features the uffd handshake granted.
        uffd_features: u64,
    },
    /// Answer to `Attach`.
    Attached {
        /// The new mirror's id.
        mirror_id: u64,
    },
    /// Answer to `Detach`.
    Detached,
    /// Answer to `Read`.
    Data {
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Answer to `Populate`.
    Populated {
        /// Pages now mirrored in the range.
        pages: u64,
    },
    /// Answer to `ClientStats`: named counters.
    Counters {
        /// Name → value.
        entries: Vec<(String, u64)>,
    },
    /// Answer to `ListClients`.
    Clients {
        /// The clients.
        clients: Vec<ClientInfo>,
    },
    /// Answer to `ListMirrors`.
    Mirrors {
        /// The mirrors.
        mirrors: Vec<MirrorInfo>,
    },
    /// Answer to `Status`: settings as text and every counter.
    StatusReport {
        /// Name → value (`daemon.version`, `socket`, `device.mode`, …).
        info: Vec<(String, String)>,
        /// Name → value.
        counters: Vec<(String, u64)>,
    },
    /// Answer to `Invalidate`.
    Invalidated {
        /// What it did.
        report: InvalidationReport,
    },
    /// First answer to `Trace`: the stream is open.
    TraceStarted,
    /// One invalidation seen by a `Trace` subscriber.
    TraceEvent {
        /// Records this subscriber lost (it read too slowly) since the previous one.
        dropped: u64,
        /// What happened.
        report: InvalidationReport,
    },
    /// Answer to `Sync` and `SyncPid`.
    Synced {
        /// What the collection did.
        report: SyncReport,
    },
    /// A refused request.
    Error {
        /// What kind of refusal.
        code: ErrorCode,
        /// A human-readable reason.
        message: String,
    },
}

/// Error codes of [`Response::Error`]; unknown codes from a newer peer are kept as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A malformed message or field. When the message itself could not be received or
    /// decoded (the session may be out of step), the session is closed after this error; a
    /// decodable request with a bad field (unknown flags, say) is only refused.
    BadMessage,
    /// No common protocol version.
    ProtocolVersion,
    /// A request that is not valid in the session's state (e.g. `Attach` before `Bind`).
    OutOfOrder,
    /// Missing, extra or wrong fds.
    BadFd,
    /// A bogus range: empty, unaligned, overflowing, kernel address, or not mapped.
    BadRange,
    /// The range overlaps one already attached. Not sent since protocol 2, which lets
    /// mirrors overlap; kept so that the value is never given another meaning.
    Overlap,
    /// The address is not in any mirror.
    NotMirrored,
    /// No mirror with that id.
    NoSuchMirror,
    /// A per-client quota would be exceeded.
    QuotaExceeded,
    /// Too many clients (per uid or in total).
    TooManyClients,
    /// Another userfaultfd already watches the range (`EBUSY`).
    AlreadyWatched,
    /// The request touches what this client may not.
    PermissionDenied,
    /// The client's memory could not be read.
    AccessFailed,
    /// The daemon is shutting down.
    ShuttingDown,
    /// A daemon-side failure.
    Internal,
    /// No bound client with that pid.
    NoSuchClient,
    /// Something this daemon cannot do for this client (e.g. `Sync` without a dirty-tracking
    /// back end the client can use).
    Unsupported,
    /// The shadow buffer has no free slot for this client (every client's share is in use);
    /// the client's own quota is not the cause (that is [`ErrorCode::QuotaExceeded`]).
    ShadowFull,
    /// The daemon ran out of a system resource (file descriptors, memory) serving the
    /// request; trying again later may work.
    OutOfResources,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// The wire value.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::BadMessage => 1,
            ErrorCode::ProtocolVersion => 2,
            ErrorCode::OutOfOrder => 3,
            ErrorCode::BadFd => 4,
            ErrorCode::BadRange => 5,
            ErrorCode::Overlap => 6,
            ErrorCode::NotMirrored => 7,
            ErrorCode::NoSuchMirror => 8,
            ErrorCode::QuotaExceeded => 9,
            ErrorCode::TooManyClients => 10,
            ErrorCode::AlreadyWatched => 11,
            ErrorCode::PermissionDenied => 12,
            ErrorCode::AccessFailed => 13,
            ErrorCode::ShuttingDown => 14,
            ErrorCode::Internal => 15,
            ErrorCode::NoSuchClient => 16,
            ErrorCode::Unsupported => 17,
            ErrorCode::ShadowFull => 18,
            ErrorCode::OutOfResources => 19,
            ErrorCode::Other(c) => c,
        }
    }

    /// From the wire value.
    pub fn from_code(c: u16) -> ErrorCode {
        const KNOWN: [ErrorCode; 19] = [
            ErrorCode::BadMessage,
            ErrorCode::ProtocolVersion,
            ErrorCode::OutOfOrder,
            ErrorCode::BadFd,
            ErrorCode::BadRange,
            ErrorCode::Overlap,
            ErrorCode::NotMirrored,
            ErrorCode::NoSuchMirror,
            ErrorCode::QuotaExceeded,
            ErrorCode::TooManyClients,
            ErrorCode::AlreadyWatched,
            ErrorCode::PermissionDenied,
            ErrorCode::AccessFailed,
            ErrorCode::ShuttingDown,
            ErrorCode::Internal,
            ErrorCode::NoSuchClient,
            ErrorCode::Unsupported,
            ErrorCode::ShadowFull,
            ErrorCode::OutOfResources,
        ];
        KNOWN
            .into_iter()
            .find(|k| k.code() == c)
            .unwrap_or(ErrorCode::Other(c))
    }
}

mod ty {
    pub const HELLO: u16 = 0x0001;
    pub const BIND: u16 = 0x0002;
    pub const ATTACH: u16 = 0x0003;
    pub const DETACH: u16 = 0x0004;
    pub const READ: u16 = 0x0005;
    pub const POPULATE: u16 = 0x0006;
    pub const CLIENT_STATS: u16 = 0x0007;
    pub const STATUS: u16 = 0x0008;
    pub const LIST_CLIENTS: u16 = 0x0009;
    pub const LIST_MIRRORS: u16 = 0x000a;
    pub const PEEK: u16 = 0x0010;
    pub const INVALIDATE: u16 = 0x0011;
    pub const TRACE: u16 = 0x0012;
    pub const SYNC: u16 = 0x0020;
    pub const SYNC_PID: u16 = 0x0021;
    pub const RESPONSE: u16 = 0x8000;
    pub const HELLO_ACK: u16 = 0x8001;
    pub const BOUND: u16 = 0x8002;
    pub const ATTACHED: u16 = 0x8003;
    pub const DETACHED: u16 = 0x8004;
    pub const DATA: u16 = 0x8005;
    pub const POPULATED: u16 = 0x8006;
    pub const COUNTERS: u16 = 0x8007;
    pub const CLIENTS: u16 = 0x8008;
    pub const MIRRORS: u16 = 0x8009;
    pub const STATUS_REPORT: u16 = 0x8010;
    pub const INVALIDATED: u16 = 0x8011;
    pub const TRACE_STARTED: u16 = 0x8012;
    pub const TRACE_EVENT: u16 = 0x8013;
    pub const SYNCED: u16 = 0x8020;
    pub const ERROR: u16 = 0x80ff;
}

fn payload_err(what: &'static str) -> impl FnOnce(CodecError) -> DecodeError {
    move |source| DecodeError::Payload { what, source }
}

fn check_fds(
    msg_type: u16,
    got: usize,
    allowed: std::ops::RangeInclusive<usize>,
    want: &'static str,
) -> Result<(), DecodeError> {
    if allowed.contains(&got) {
        Ok(())
    } else {
        Err(DecodeError::FdCount {
            msg_type,
            want,
            got,
        })
    }
}

impl Request {
    /// The wire type.
    pub fn msg_type(&self) -> u16 {
        match self {
            Request::Hello { .. } => ty::HELLO,
            Request::Bind { .. } => ty::BIND,
            Request::Attach { .. } => ty::ATTACH,
            Request::Detach { .. } => ty::DETACH,
            Request::Read { .. } => ty::READ,
            Request::Populate { .. } => ty::POPULATE,
            Request::ClientStats => ty::CLIENT_STATS,
            Request::Status => ty::STATUS,
            Request::ListClients => ty::LIST_CLIENTS,
            Request::ListMirrors { .. } => ty::LIST_MIRRORS,
            Request::Peek { .. } => ty::PEEK,
            Request::Invalidate { .. } => ty::INVALIDATE,
            Request::Trace { .. } => ty::TRACE,
            Request::Sync { .. } => ty::SYNC,
            Request::SyncPid { .. } => ty::SYNC_PID,
        }
    }

    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Bind { .. } => "bind",
            Request::Attach { .. } => "attach",
            Request::Detach { .. } => "detach",
            Request::Read { .. } => "read",
            Request::Populate { .. } => "populate",
            Request::ClientStats => "client-stats",
            Request::Status => "status",
            Request::ListClients => "list-clients",
            Request::ListMirrors { .. } => "list-mirrors",
            Request::Peek { .. } => "peek",
            Request::Invalidate { .. } => "invalidate",
            Request::Trace { .. } => "trace",
            Request::Sync { .. } => "sync",
            Request::SyncPid { .. } => "sync-pid",
        }
    }

    /// Encodes the payload.
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Request::Hello {
                min_version,
                max_version,
                name,
            } => {
                w.u16(*min_version).u16(*max_version).str(name, MAX_NAME);
            }
            Request::Bind { flags } => {
                w.u32(*flags);
            }
            Request::Attach { addr, len, flags } => {
                w.u64(*addr).u64(*len).u32(*flags);
            }
            Request::Detach { mirror_id } => {
                w.u64(*mirror_id);
            }
            Request::Read {
                mirror_id,
                offset,
                len,
            } => {
                w.u64(*mirror_id).u64(*offset).u32(*len);
            }
            Request::Populate {
                mirror_id,
                offset,
                len,
            } => {
                w.u64(*mirror_id).u64(*offset).u64(*len);
            }
            Request::ListMirrors { pid } => {
                w.i32(*pid);
            }
            Request::Peek { pid, addr, len } => {
                w.i32(*pid).u64(*addr).u32(*len);
            }
            Request::Invalidate {
                pid,
                addr,
                len,
                event,
                flags,
            } => {
                w.i32(*pid).u64(*addr).u64(*len).u8(event.code()).u8(*flags);
            }
            Request::Trace { pid, events } => {
                w.i32(*pid).u32(*events);
            }
            Request::Sync { mirror_id } => {
                w.u64(*mirror_id);
            }
            Request::SyncPid { pid } => {
                w.i32(*pid);
            }
            Request::ClientStats | Request::Status | Request::ListClients => {}
        }
        w.into_bytes()
    }

    /// Decodes a request of type `msg_type` that arrived with `fds` file descriptors.
    pub fn decode(msg_type: u16, payload: &[u8], fds: usize) -> Result<Request, DecodeError> {
        if msg_type & ty::RESPONSE != 0 {
            return Err(if Response::known(msg_type) {
                DecodeError::WrongDirection(msg_type)
            } else {
                DecodeError::UnknownType(msg_type)
            });
        }
        if msg_type == ty::BIND {
            check_fds(msg_type, fds, 2..=5, "2 to 5")?;
        } else {
            check_fds(msg_type, fds, 0..=0, "none")?;
        }
        let mut r = Reader::new(payload);
        let req = (|| -> Result<Request, CodecError> {
            Ok(match msg_type {
                ty::HELLO => Request::Hello {
                    min_version: r.u16("min_version")?,
                    max_version: r.u16("max_version")?,
                    name: r.str("name", MAX_NAME)?,
                },
                ty::BIND => Request::Bind {
                    flags: r.u32("flags")?,
                },
                ty::ATTACH => Request::Attach {
                    addr: r.u64("addr")?,
                    len: r.u64("len")?,
                    flags: r.u32("flags")?,
                },
                ty::DETACH => Request::Detach {
                    mirror_id: r.u64("mirror_id")?,
                },
                ty::READ => Request::Read {
                    mirror_id: r.u64("mirror_id")?,
                    offset: r.u64("offset")?,
                    len: r.u32("len")?,
                },
                ty::POPULATE => Request::Populate {
                    mirror_id: r.u64("mirror_id")?,
                    offset: r.u64("offset")?,
                    len: r.u64("len")?,
                },
                ty::CLIENT_STATS => Request::ClientStats,
                ty::STATUS => Request::Status,
                ty::LIST_CLIENTS => Request::ListClients,
                ty::LIST_MIRRORS => Request::ListMirrors { pid: r.i32("pid")? },
                ty::PEEK => Request::Peek {
                    pid: r.i32("pid")?,
                    addr: r.u64("addr")?,
                    len: r.u32("len")?,
                },
                ty::INVALIDATE => Request::Invalidate {
                    pid: r.i32("pid")?,
                    addr: r.u64("addr")?,
                    len: r.u64("len")?,
                    event: EventKind::decode(&mut r)?,
                    flags: r.u8("flags")?,
                },
                ty::TRACE => Request::Trace {
                    pid: r.i32("pid")?,
                    events: r.u32("events")?,
                },
                ty::SYNC => Request::Sync {
                    mirror_id: r.u64("mirror_id")?,
                },
                ty::SYNC_PID => Request::SyncPid { pid: r.i32("pid")? },
                other => {
                    return Err(CodecError::BadValue {
                        field: "msg_type",
                        value: other.into(),
                    })
                }
            })
        })();
        let req = match req {
            Err(CodecError::BadValue {
                field: "msg_type", ..
            }) => return Err(DecodeError::UnknownType(msg_type)),
            other => other.map_err(payload_err("request"))?,
        };
        r.finish().map_err(payload_err("request"))?;
        Ok(req)
    }
}

impl Request {
    fn known(msg_type: u16) -> bool {
        matches!(
            msg_type,
            ty::HELLO..=ty::LIST_MIRRORS | ty::PEEK..=ty::TRACE | ty::SYNC..=ty::SYNC_PID
        )
    }
}

impl Response {
    fn known(msg_type: u16) -> bool {
        matches!(
            msg_type,
            ty::HELLO_ACK..=ty::MIRRORS
                | ty::STATUS_REPORT..=ty::TRACE_EVENT
                | ty::SYNCED
                | ty::ERROR
        )
    }

    /// The wire type.
    pub fn msg_type(&self) -> u16 {
        match self {
            Response::HelloAck { .. } => ty::HELLO_ACK,
            Response::Bound { .. } => ty::BOUND,
            Response::Attached { .. } => ty::ATTACHED,
            Response::Detached => ty::DETACHED,
            Response::Data { .. } => ty::DATA,
            Response::Populated { .. } => ty::POPULATED,
            Response::Counters { .. } => ty::COUNTERS,
            Response::Clients { .. } => ty::CLIENTS,
            Response::Mirrors { .. } => ty::MIRRORS,
            Response::StatusReport { .. } => ty::STATUS_REPORT,
            Response::Invalidated { .. } => ty::INVALIDATED,
            Response::TraceStarted => ty::TRACE_STARTED,
            Response::TraceEvent { .. } => ty::TRACE_EVENT,
            Response::Synced { .. } => ty::SYNCED,
            Response::Error { .. } => ty::ERROR,
        }
    }

    /// Shorthand for an error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error {
            code,
            message: message.into(),
        }
    }

    /// Encodes the payload. Lists longer than [`MAX_LIST`] are cut to it.
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Response::HelloAck {
                version,
                daemon_version,
                page_size,
                limits,
            } => {
                w.u16(*version)
                    .str(daemon_version, MAX_NAME)
                    .u32(*page_size);
                w.u32(limits.max_payload)
                    .u16(limits.max_fds)
                    .u32(limits.max_read)
                    .u64(limits.shadow_bytes)
                    .u32(limits.mirrors)
                    .u32(limits.inflight)
                    .u32(limits.clients_per_uid);
            }
            Response::Bound {
                access,
                uffd_features,
            } => {
                w.u8(access.code()).u64(*uffd_features);
            }
            Response::Attached { mirror_id } => {
                w.u64(*mirror_id);
            }
            Response::Detached => {}
            Response::Data { bytes } => {
                w.bytes(&bytes[..bytes.len().min(MAX_READ)]);
            }
            Response::Populated { pages } => {
                w.u64(*pages);
            }
            Response::Counters { entries } => {
                let n = entries.len().min(MAX_LIST);
                w.u32(n as u32);
                for (name, value) in &entries[..n] {
                    w.str(name, MAX_NAME).u64(*value);
                }
            }
            Response::Clients { clients } => {
                let n = clients.len().min(MAX_LIST);
                w.u32(n as u32);
                for c in &clients[..n] {
                    w.u64(c.id)
                        .i32(c.pid)
                        .u32(c.uid)
                        .u8(c.bound.into())
                        .u32(c.mirrors)
                        .u64(c.shadow_bytes)
                        .u64(c.events)
                        .str(&c.comm, MAX_NAME)
                        .u64(c.faults)
                        .u64(c.invalidations);
                }
            }
            Response::Mirrors { mirrors } => {
                let n = mirrors.len().min(MAX_LIST);
                w.u32(n as u32);
                for m in &mirrors[..n] {
                    w.u64(m.id)
                        .u64(m.addr)
                        .u64(m.len)
                        .u64(m.pages)
                        .i32(m.pid)
                        .u64(m.seq)
                        .str(&m.state, MAX_NAME);
                }
            }
            Response::StatusReport { info, counters } => {
                let n = info.len().min(MAX_LIST);
                w.u32(n as u32);
                for (name, value) in &info[..n] {
                    w.str(name, MAX_NAME).str(value, MAX_VALUE);
                }
                let n = counters.len().min(MAX_LIST);
                w.u32(n as u32);
                for (name, value) in &counters[..n] {
                    w.str(name, MAX_NAME).u64(*value);
                }
            }
            Response::Invalidated { report } => report.encode(&mut w),
            Response::TraceStarted => {}
            Response::TraceEvent { dropped, report } => {
                w.u64(*dropped);
                report.encode(&mut w);
            }
            Response::Synced { report } => report.encode(&mut w),
            Response::Error { code, message } => {
                w.u16(code.code()).str(message, 1024);
            }
        }
        let bytes = w.into_bytes();
        debug_assert!(bytes.len() <= MAX_PAYLOAD);
        bytes
    }

    /// Decodes a response of type `msg_type` that arrived with `fds` file descriptors.
    pub fn decode(msg_type: u16, payload: &[u8], fds: usize) -> Result<Response, DecodeError> {
        if !Response::known(msg_type) {
            return Err(if Request::known(msg_type) {
                DecodeError::WrongDirection(msg_type)
            } else {
                DecodeError::UnknownType(msg_type)
            });
        }
        check_fds(msg_type, fds, 0..=0, "none")?;
        let mut r = Reader::new(payload);
        let resp = (|| -> Result<Response, CodecError> {
            Ok(match msg_type {
                ty::HELLO_ACK => Response::HelloAck {
                    version: r.u16("version")?,
                    daemon_version: r.str("daemon_version", MAX_NAME)?,
                    page_size: r.u32("page_size")?,
                    limits: Limits {
                        max_payload: r.u32("max_payload")?,
                        max_fds: r.u16("max_fds")?,
                        max_read: r.u32("max_read")?,
                        shadow_bytes: r.u64("shadow_bytes")?,
                        mirrors: r.u32("mirrors")?,
                        inflight: r.u32("inflight")?,
                        clients_per_uid: r.u32("clients_per_uid")?,
                    },
                },
                ty::BOUND => Response::Bound {
                    access: AccessPath::from_code(r.u8("access")?)?,
                    uffd_features: r.u64("uffd_features")?,
                },
                ty::ATTACHED => Response::Attached {
                    mirror_id: r.u64("mirror_id")?,
                },
                ty::DETACHED => Response::Detached,
                ty::DATA => Response::Data {
                    bytes: r.bytes("bytes", MAX_READ)?,
                },
                ty::POPULATED => Response::Populated {
                    pages: r.u64("pages")?,
                },
                ty::COUNTERS => {
                    let n = r.count("entries", MAX_LIST, 2 + 8)?;
                    let mut entries = Vec::with_capacity(n);
                    for _ in 0..n {
                        entries.push((r.str("name", MAX_NAME)?, r.u64("value")?));
                    }
                    Response::Counters { entries }
                }
                ty::CLIENTS => {
                    let n = r.count("clients", MAX_LIST, 37 + 2 + 16)?;
                    let mut clients = Vec::with_capacity(n);
                    for _ in 0..n {
                        clients.push(ClientInfo {
                            id: r.u64("id")?,
                            pid: r.i32("pid")?,
                            uid: r.u32("uid")?,
                            bound: bool_field(&mut r, "bound")?,
                            mirrors: r.u32("mirrors")?,
                            shadow_bytes: r.u64("shadow_bytes")?,
                            events: r.u64("events")?,
                            comm: r.str("comm", MAX_NAME)?,
                            faults: r.u64("faults")?,
                            invalidations: r.u64("invalidations")?,
                        });
                    }
                    Response::Clients { clients }
                }
                ty::MIRRORS => {
                    let n = r.count("mirrors", MAX_LIST, 32 + 4 + 8 + 2)?;
                    let mut mirrors = Vec::with_capacity(n);
                    for _ in 0..n {
                        mirrors.push(MirrorInfo {
                            id: r.u64("id")?,
                            addr: r.u64("addr")?,
                            len: r.u64("len")?,
                            pages: r.u64("pages")?,
                            pid: r.i32("pid")?,
                            seq: r.u64("seq")?,
                            state: r.str("state", MAX_NAME)?,
                        });
                    }
                    Response::Mirrors { mirrors }
                }
                ty::STATUS_REPORT => {
                    let n = r.count("info", MAX_LIST, 2 + 2)?;
                    let mut info = Vec::with_capacity(n);
                    for _ in 0..n {
                        info.push((r.str("name", MAX_NAME)?, r.str("value", MAX_VALUE)?));
                    }
                    let n = r.count("counters", MAX_LIST, 2 + 8)?;
                    let mut counters = Vec::with_capacity(n);
                    for _ in 0..n {
                        counters.push((r.str("name", MAX_NAME)?, r.u64("value")?));
                    }
                    Response::StatusReport { info, counters }
                }
                ty::INVALIDATED => Response::Invalidated {
                    report: InvalidationReport::decode(&mut r)?,
                },
                ty::TRACE_STARTED => Response::TraceStarted,
                ty::TRACE_EVENT => Response::TraceEvent {
                    dropped: r.u64("dropped")?,
                    report: InvalidationReport::decode(&mut r)?,
                },
                ty::SYNCED => Response::Synced {
                    report: SyncReport::decode(&mut r)?,
                },
                _ => Response::Error {
                    code: ErrorCode::from_code(r.u16("code")?),
                    message: r.str("message", 1024)?,
                },
            })
        })()
        .map_err(payload_err("response"))?;
        r.finish().map_err(payload_err("response"))?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn requests() -> Vec<(Request, usize)> {
        vec![
            (
                Request::Hello {
                    min_version: 1,
                    max_version: 3,
                    name: "demo".into(),
                },
                0,
            ),
            (Request::Bind { flags: 0 }, 2),
            (Request::Bind { flags: 0 }, 3),
            (
                Request::Attach {
                    addr: 0x7f00_0000_0000,
                    len: 1 << 20,
                    flags: 0,
                },
                0,
            ),
            (Request::Detach { mirror_id: 9 }, 0),
            (
                Request::Read {
                    mirror_id: 1,
                    offset: 4096,
                    len: 100,
                },
                0,
            ),
            (
                Request::Populate {
                    mirror_id: 1,
                    offset: 0,
                    len: 1 << 30,
                },
                0,
            ),
            (Request::ClientStats, 0),
            (Request::Status, 0),
            (Request::ListClients, 0),
            (Request::ListMirrors { pid: 0 }, 0),
            (Request::ListMirrors { pid: -1 }, 0),
            (
                Request::Peek {
                    pid: 77,
                    addr: 0x7000,
                    len: 16,
                },
                0,
            ),
            (
                Request::Invalidate {
                    pid: 77,
                    addr: 0x7000,
                    len: 4096,
                    event: EventKind::SoftDirty,
                    flags: INVALIDATE_NON_BLOCKING,
                },
                0,
            ),
            (
                Request::Trace {
                    pid: 0,
                    events: 0b11,
                },
                0,
            ),
            (
                Request::Bind {
                    flags: BIND_UFFD_PRIVILEGED,
                },
                3,
            ),
            (
                Request::Attach {
                    addr: 0x7f00_0000_0000,
                    len: 1 << 21,
                    flags: AttachPolicy::Periodic { period_ms: 250 }.flags(),
                },
                0,
            ),
            (Request::Sync { mirror_id: 0 }, 0),
            (Request::Sync { mirror_id: 7 }, 0),
            (Request::SyncPid { pid: 4242 }, 0),
        ]
    }

    fn sync_report() -> SyncReport {
        SyncReport {
            backend: DirtyBackend::PagemapScan,
            mirrors: 2,
            pages_scanned: 262_144,
            pages_dirty: 2621,
            regions: 2600,
            scan_ns: 450_000,
            invalidate_ns: 1_200_000,
        }
    }

    #[test]
    fn sync_report_has_a_fixed_size_and_checks_the_backend() {
        let payload = Response::Synced {
            report: sync_report(),
        }
        .encode_payload();
        assert_eq!(payload.len(), SyncReport::WIRE_LEN);
        for (code, b) in [
            (1u8, DirtyBackend::PagemapScan),
            (2, DirtyBackend::SoftDirty),
            (3, DirtyBackend::UffdWp),
        ] {
            let mut p = payload.clone();
            p[0] = code;
            assert!(matches!(
                Response::decode(ty::SYNCED, &p, 0),
                Ok(Response::Synced { report }) if report.backend == b
            ));
        }
        for bad in [0u8, 4, 255] {
            let mut p = payload.clone();
            p[0] = bad;
            assert!(matches!(
                Response::decode(ty::SYNCED, &p, 0),
                Err(DecodeError::Payload { .. })
            ));
        }
    }

    #[test]
    fn attach_policies_round_trip_through_flags() {
        for p in [
            AttachPolicy::Default,
            AttachPolicy::Manual,
            AttachPolicy::Strict,
            AttachPolicy::Periodic { period_ms: 1 },
            AttachPolicy::Periodic { period_ms: 250 },
            AttachPolicy::Periodic {
                period_ms: MAX_PERIOD_MS,
            },
        ] {
            assert_eq!(AttachPolicy::from_flags(p.flags()), Ok(p));
        }
        assert_eq!(AttachPolicy::from_flags(0), Ok(AttachPolicy::Default));
        // A period without the periodic kind, periodic without a period, stray bits.
        for bad in [1 | (5 << ATTACH_PERIOD_SHIFT), 3, 0x4, 0x80, 2 | 0x10] {
            assert!(AttachPolicy::from_flags(bad).is_err(), "{bad:#x}");
        }
        assert_eq!(
            AttachPolicy::Periodic {
                period_ms: u32::MAX
            }
            .flags(),
            AttachPolicy::Periodic {
                period_ms: MAX_PERIOD_MS
            }
            .flags()
        );
    }

    fn report() -> InvalidationReport {
        InvalidationReport {
            pid: 42,
            event: EventKind::Clear,
            start: 0x1000,
            end: 0x3000,
            notifiers: 1,
            would_block: true,
            start_ns: 1500,
            finish_ns: 52_000,
            flushes_queued: 2,
            flushes_coalesced: 1,
        }
    }

    #[test]
    fn invalidation_report_has_a_fixed_size() {
        let payload = Response::Invalidated { report: report() }.encode_payload();
        assert_eq!(payload.len(), InvalidationReport::WIRE_LEN);
    }

    #[test]
    fn event_kinds_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_code(k.code()), Some(k));
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(EventKind::from_code(0), None);
        assert_eq!(EventKind::from_code(7), None);
    }

    fn responses() -> Vec<Response> {
        vec![
            Response::HelloAck {
                version: 1,
                daemon_version: "0.1.0".into(),
                page_size: 4096,
                limits: Limits {
                    max_payload: 65536,
                    max_fds: 4,
                    max_read: 61440,
                    shadow_bytes: 1 << 30,
                    mirrors: 64,
                    inflight: 16,
                    clients_per_uid: 32,
                },
            },
            Response::Bound {
                access: AccessPath::MemFd,
                uffd_features: 0x1ffff,
            },
            Response::Attached { mirror_id: 3 },
            Response::Detached,
            Response::Data {
                bytes: vec![7; MAX_READ],
            },
            Response::Populated { pages: 12 },
            Response::Counters {
                entries: vec![("slots_used".into(), 5), ("events".into(), u64::MAX)],
            },
            Response::Clients {
                clients: vec![ClientInfo {
                    id: 1,
                    pid: 42,
                    uid: 1000,
                    bound: true,
                    mirrors: 2,
                    shadow_bytes: 8192,
                    events: 7,
                    comm: "demo".into(),
                    faults: 3,
                    invalidations: 2,
                }],
            },
            Response::Mirrors {
                mirrors: vec![MirrorInfo {
                    id: 1,
                    addr: 0x1000,
                    len: 0x2000,
                    pages: 1,
                    pid: 42,
                    seq: 5,
                    state: "active, 1 hole".into(),
                }],
            },
            Response::StatusReport {
                info: vec![("socket".into(), "/run/memshadow/memshadowd.sock".into())],
                counters: vec![("server.clients".into(), 3)],
            },
            Response::Invalidated { report: report() },
            Response::TraceStarted,
            Response::TraceEvent {
                dropped: 2,
                report: report(),
            },
            Response::error(ErrorCode::QuotaExceeded, "shadow quota of 1 GiB reached"),
            Response::error(ErrorCode::Other(999), "from the future"),
            Response::Synced {
                report: sync_report(),
            },
            Response::error(ErrorCode::Unsupported, "dirty tracking is off"),
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for (req, fds) in requests() {
            let payload = req.encode_payload();
            assert!(payload.len() <= MAX_PAYLOAD);
            assert_eq!(Request::decode(req.msg_type(), &payload, fds), Ok(req));
        }
    }

    #[test]
    fn every_response_round_trips() {
        for resp in responses() {
            let payload = resp.encode_payload();
            assert!(payload.len() <= MAX_PAYLOAD, "{resp:?} is too big");
            assert_eq!(Response::decode(resp.msg_type(), &payload, 0), Ok(resp));
        }
    }

    #[test]
    fn every_error_code_round_trips() {
        for c in 0..=20u16 {
            assert_eq!(ErrorCode::from_code(c).code(), c);
        }
    }

    #[test]
    fn fd_counts_types_and_directions_are_checked() {
        let bind = Request::Bind { flags: 0 };
        assert!(matches!(
            Request::decode(bind.msg_type(), &bind.encode_payload(), 1),
            Err(DecodeError::FdCount { got: 1, .. })
        ));
        assert!(matches!(
            Request::decode(bind.msg_type(), &bind.encode_payload(), 6),
            Err(DecodeError::FdCount { .. })
        ));
        assert!(matches!(
            Request::decode(ty::STATUS, &[], 1),
            Err(DecodeError::FdCount { .. })
        ));
        assert_eq!(
            Request::decode(0x0077, &[], 0),
            Err(DecodeError::UnknownType(0x0077))
        );
        assert_eq!(
            Request::decode(ty::DETACHED, &[], 0),
            Err(DecodeError::WrongDirection(ty::DETACHED))
        );
        assert_eq!(
            Response::decode(ty::STATUS, &[], 0),
            Err(DecodeError::WrongDirection(ty::STATUS))
        );
        assert_eq!(
            Response::decode(0x8077, &[], 0),
            Err(DecodeError::UnknownType(0x8077))
        );
        assert!(matches!(
            Request::decode(ty::STATUS, &[0], 0),
            Err(DecodeError::Payload { .. })
        ));
        assert!(matches!(
            Request::decode(ty::DETACH, &[0; 7], 0),
            Err(DecodeError::Payload { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Arbitrary bytes of any type never panic, and what decodes re-encodes to itself.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(msg_type in prop_oneof![0u16..0x14, 0x8000u16..0x8014, 0x001eu16..0x0024, 0x801eu16..0x8024, Just(0x80ffu16), any::<u16>()],
                                                 payload in proptest::collection::vec(any::<u8>(), 0..256),
                                                 fds in 0usize..5) {
            if let Ok(req) = Request::decode(msg_type, &payload, fds) {
                prop_assert_eq!(req.encode_payload(), payload.clone());
            }
            if let Ok(resp) = Response::decode(msg_type, &payload, fds) {
                prop_assert_eq!(resp.encode_payload(), payload);
            }
        }

        /// Mutating one byte of a valid message never panics.
        #[test]
        fn mutated_messages_never_panic(i in 0usize..17, pos in any::<usize>(), byte in any::<u8>()) {
            let resp = &responses()[i];
            let mut payload = resp.encode_payload();
            if !payload.is_empty() {
                let p = pos % payload.len();
                payload[p] = byte;
            }
            let _ = Response::decode(resp.msg_type(), &payload, 0);
        }
    }
}
