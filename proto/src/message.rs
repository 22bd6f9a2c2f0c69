//! The typed messages: requests a client sends, responses and errors the daemon returns.
//!
//! Requests have types `0x0001..`, responses `0x8001..`; a response carries the
//! `request_id` of the request it answers. Each message is defined once, in the tables of
//! [`Request`] and [`Response`] below ([`crate::wire`]); decoding checks the payload field
//! by field ([`crate::codec::Reader`]) and the number of fds the message type allows.

use crate::codec::{CodecError, Reader, Writer};
use crate::header::MAX_PAYLOAD;
use crate::wire::{messages, Field};

/// Longest name (client name, counter name, version string) on the wire.
pub const MAX_NAME: usize = 64;
/// Largest device read one `Read` request may ask for (its answer must fit one message).
pub const MAX_READ: usize = 60 * 1024;
/// Most entries of a list response (counters, clients, mirrors).
pub const MAX_LIST: usize = 1024;
/// Longest value of a status line (a socket path fits).
pub const MAX_VALUE: usize = 256;
/// `Attach` flags: the bits that choose the collection policy of written pages
/// ([`AttachPolicy`]).
pub const ATTACH_POLICY_MASK: u32 = 0x3;
/// `Attach` flags, protocol 4: with the manual kind, the range is not write-protected for
/// dirty tracking at attach but at its first `Sync`, which invalidates all of it
/// ([`AttachPolicy::Lazy`]).
pub const ATTACH_ARM_AT_SYNC: u32 = 0x4;
/// `Attach` flags: the period of [`AttachPolicy::Periodic`], in ms, sits above this bit.
pub const ATTACH_PERIOD_SHIFT: u32 = 8;
/// Longest period [`AttachPolicy::Periodic`] can carry (24 bits of ms, about 4.6 h).
pub const MAX_PERIOD_MS: u32 = (1 << (32 - ATTACH_PERIOD_SHIFT)) - 1;

/// When the daemon collects the written pages of an attached range, carried in
/// the `flags` of `Attach`: bits 0-1 the kind, bit 2 [`ATTACH_ARM_AT_SYNC`] (manual only),
/// bits 8-31 the period of `Periodic` in ms, bits 3-7 zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachPolicy {
    /// The daemon's default (`--dirty-policy`).
    Default,
    /// Only on an explicit `Sync`.
    Manual,
    /// Only on an explicit `Sync`, and nothing is tracked before the first: the first `Sync`
    /// invalidates the whole range, later ones what was written since the one before. The
    /// client's first writes to the range cost it no write-protect fault (protocol 4).
    Lazy,
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
            AttachPolicy::Lazy => 1 | ATTACH_ARM_AT_SYNC,
            AttachPolicy::Strict => 2,
            AttachPolicy::Periodic { period_ms } => {
                3 | (period_ms.clamp(1, MAX_PERIOD_MS) << ATTACH_PERIOD_SHIFT)
            }
        }
    }

    /// Reads the policy out of `Attach` flags; `Err` says what is wrong with them.
    pub fn from_flags(flags: u32) -> Result<AttachPolicy, String> {
        let period = flags >> ATTACH_PERIOD_SHIFT;
        let known =
            ATTACH_POLICY_MASK | ATTACH_ARM_AT_SYNC | (MAX_PERIOD_MS << ATTACH_PERIOD_SHIFT);
        if flags & !known != 0 {
            return Err(format!("unknown attach flags {flags:#x}"));
        }
        let lazy = flags & ATTACH_ARM_AT_SYNC != 0;
        match (flags & ATTACH_POLICY_MASK, period) {
            (1, 0) if lazy => Ok(AttachPolicy::Lazy),
            _ if lazy => Err(format!(
                "attach flags {flags:#x}: arming at the first sync goes with the manual policy only"
            )),
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

/// An external engine, as `ListEngines` reports it (protocol 3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineInfo {
    /// The engine's id.
    pub id: u32,
    /// The engine's process.
    pub pid: i32,
    /// The client it reads.
    pub client_pid: i32,
    /// The mirror it attached to.
    pub mirror_id: u64,
    /// Flush requests queued to it.
    pub flushes: u64,
    /// Flush requests not acknowledged yet (ring depth).
    pub depth: u64,
    /// Translations the engine says its TLB holds (as of its last acknowledgement).
    pub tlb_entries: u64,
    /// Acknowledgements waited for.
    pub acks: u64,
    /// Acknowledgement wait, p50, µs.
    pub ack_p50_us: u32,
    /// Acknowledgement wait, p99, µs.
    pub ack_p99_us: u32,
    /// Times the ring was full and a flush-all was queued instead.
    pub overflows: u64,
    /// Device faults it raised.
    pub faults: u64,
    /// Device writes it made.
    pub writes: u64,
    /// `attached`, `evicted` or `gone`.
    pub state: String,
}

/// The bit of a `Trace` request's event mask that asks for [`Response::TraceAck`] records
/// (protocol 3): one per external engine a finish waited for. A mask of 0 asks for them
/// too, on a session that said protocol 3 in its `Hello`.
pub const TRACE_ENGINE_ACKS: u32 = 1 << 31;

/// How a finish's wait for one external engine ended (a [`Response::TraceAck`] record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The engine acknowledged the flushes queued to it.
    Acknowledged,
    /// The engine was already gone (detached, exited or evicted): nothing to wait for.
    Gone,
    /// It did not acknowledge within the daemon's `engine_ack_timeout` and was evicted.
    Evicted,
}

impl AckOutcome {
    /// Every outcome, in wire-code order (code = index + 1).
    pub const ALL: [AckOutcome; 3] = [
        AckOutcome::Acknowledged,
        AckOutcome::Gone,
        AckOutcome::Evicted,
    ];

    /// The wire value (1..=3).
    pub fn code(self) -> u8 {
        code_in(&AckOutcome::ALL, self)
    }

    /// The name used by the CLI and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AckOutcome::Acknowledged => "acknowledged",
            AckOutcome::Gone => "gone",
            AckOutcome::Evicted => "evicted",
        }
    }
}

/// One finish's wait for one external engine's acknowledgement: the body of a
/// [`Response::TraceAck`] record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckReport {
    /// Pid of the client whose invalidation it was.
    pub pid: i32,
    /// The engine (as `ListEngines` numbers it).
    pub engine_id: u32,
    /// The engine's process.
    pub engine_pid: i32,
    /// The sequence number waited for (the engine's ring).
    pub seq: u64,
    /// How long the finish waited, in ns.
    pub wait_ns: u64,
    /// How the wait ended.
    pub outcome: AckOutcome,
}

impl AckReport {
    #[cfg(test)]
    const WIRE_LEN: usize = 4 + 4 + 4 + 8 + 8 + 1;
}

impl Field for AckReport {
    fn put(&self, w: &mut Writer) {
        w.i32(self.pid)
            .u32(self.engine_id)
            .i32(self.engine_pid)
            .u64(self.seq)
            .u64(self.wait_ns)
            .u8(self.outcome.code());
    }
    fn get(r: &mut Reader<'_>, _: &'static str) -> Result<Self, CodecError> {
        Ok(AckReport {
            pid: r.i32("pid")?,
            engine_id: r.u32("engine_id")?,
            engine_pid: r.i32("engine_pid")?,
            seq: r.u64("seq")?,
            wait_ns: r.u64("wait_ns")?,
            outcome: decode_in(r, &AckOutcome::ALL, "outcome")?,
        })
    }
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
        code_in(&EventKind::ALL, self)
    }

    /// From the wire value.
    pub fn from_code(c: u8) -> Option<EventKind> {
        from_code_in(&EventKind::ALL, c)
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
        decode_in(r, &EventKind::ALL, "event")
    }
}

/// The wire code of `k` in `all`, a table in wire-code order (code = index + 1).
fn code_in<T: PartialEq>(all: &[T], k: T) -> u8 {
    all.iter().position(|x| *x == k).map_or(0, |i| i as u8 + 1)
}

/// The entry of wire code `c` in `all`, a table in wire-code order.
fn from_code_in<T: Copy>(all: &[T], c: u8) -> Option<T> {
    all.get(usize::from(c).checked_sub(1)?).copied()
}

/// Reads a u8 wire code of `all` (field `field`); an unknown code is `BadValue`.
fn decode_in<T: Copy>(r: &mut Reader<'_>, all: &[T], field: &'static str) -> Result<T, CodecError> {
    let c = r.u8(field)?;
    from_code_in(all, c).ok_or(CodecError::BadValue {
        field,
        value: c.into(),
    })
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

bitflags::bitflags! {
    /// `Bind` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct BindFlags: u32 {
        /// The uffd was created without `UFFD_USER_MODE_ONLY`, so the kernel's own accesses
        /// to write-protected pages wait for the daemon instead of failing with `EFAULT`
        /// (docs/design.md §6); only then may the daemon track writes with synchronous
        /// write-protect faults. The claim affects only the client that makes it.
        const UFFD_PRIVILEGED = 1;
    }
}

bitflags::bitflags! {
    /// `Invalidate` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct InvalidateFlags: u8 {
        /// The invalidation may not block (a refusal is reported as `EAGAIN`).
        const NON_BLOCKING = 1;
    }
}

/// Flag words: unknown bits are refused (a newer peer's flag this side would ignore).
macro_rules! flags_field {
    ($($t:ty => $m:ident),* $(,)?) => {$(
        impl Field for $t {
            fn put(&self, w: &mut Writer) {
                w.$m(self.bits());
            }
            fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError> {
                let bits = r.$m(name)?;
                <$t>::from_bits(bits).ok_or(CodecError::BadValue {
                    field: name,
                    value: bits.into(),
                })
            }
        }
    )*};
}

flags_field!(BindFlags => u32, InvalidateFlags => u8);

impl Field for AttachPolicy {
    fn put(&self, w: &mut Writer) {
        w.u32(self.flags());
    }
    fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError> {
        let flags = r.u32(name)?;
        AttachPolicy::from_flags(flags).map_err(|_| CodecError::BadValue {
            field: name,
            value: flags.into(),
        })
    }
}

impl Field for EventKind {
    fn put(&self, w: &mut Writer) {
        w.u8(self.code());
    }
    fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError> {
        decode_in(r, &EventKind::ALL, name)
    }
}

impl Field for AccessPath {
    fn put(&self, w: &mut Writer) {
        w.u8(self.code());
    }
    fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError> {
        let _ = name;
        AccessPath::from_code(r.u8("access")?)
    }
}

impl Field for ErrorCode {
    fn put(&self, w: &mut Writer) {
        w.u16(self.code());
    }
    fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError> {
        Ok(ErrorCode::from_code(r.u16(name)?))
    }
}

impl Field for Limits {
    fn put(&self, w: &mut Writer) {
        w.u32(self.max_payload)
            .u16(self.max_fds)
            .u32(self.max_read)
            .u64(self.shadow_bytes)
            .u32(self.mirrors)
            .u32(self.inflight)
            .u32(self.clients_per_uid);
    }
    fn get(r: &mut Reader<'_>, _: &'static str) -> Result<Self, CodecError> {
        Ok(Limits {
            max_payload: r.u32("max_payload")?,
            max_fds: r.u16("max_fds")?,
            max_read: r.u32("max_read")?,
            shadow_bytes: r.u64("shadow_bytes")?,
            mirrors: r.u32("mirrors")?,
            inflight: r.u32("inflight")?,
            clients_per_uid: r.u32("clients_per_uid")?,
        })
    }
}

impl Field for InvalidationReport {
    fn put(&self, w: &mut Writer) {
        self.encode(w);
    }
    fn get(r: &mut Reader<'_>, _: &'static str) -> Result<Self, CodecError> {
        InvalidationReport::decode(r)
    }
}

impl Field for SyncReport {
    fn put(&self, w: &mut Writer) {
        self.encode(w);
    }
    fn get(r: &mut Reader<'_>, _: &'static str) -> Result<Self, CodecError> {
        SyncReport::decode(r)
    }
}

/// The bytes of a device read (at most [`MAX_READ`]).
impl Field for Vec<u8> {
    fn put(&self, w: &mut Writer) {
        w.bytes(&self[..self.len().min(MAX_READ)]);
    }
    fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError> {
        r.bytes(name, MAX_READ)
    }
}

/// An entry of a list response: how it is coded, and the fewest bytes it takes (so that a
/// count can be checked against the bytes left before anything is reserved).
pub trait Item: Sized {
    /// Fewest encoded bytes of one entry.
    const MIN_LEN: usize;
    /// Appends the entry.
    fn put_item(&self, w: &mut Writer);
    /// Reads one entry.
    fn get_item(r: &mut Reader<'_>) -> Result<Self, CodecError>;
}

impl Item for (String, u64) {
    const MIN_LEN: usize = 2 + 8;
    fn put_item(&self, w: &mut Writer) {
        w.str(&self.0, MAX_NAME).u64(self.1);
    }
    fn get_item(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok((r.str("name", MAX_NAME)?, r.u64("value")?))
    }
}

impl Item for (String, String) {
    const MIN_LEN: usize = 2 + 2;
    fn put_item(&self, w: &mut Writer) {
        w.str(&self.0, MAX_NAME).str(&self.1, MAX_VALUE);
    }
    fn get_item(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok((r.str("name", MAX_NAME)?, r.str("value", MAX_VALUE)?))
    }
}

impl Item for ClientInfo {
    const MIN_LEN: usize = 37 + 2 + 16;
    fn put_item(&self, w: &mut Writer) {
        w.u64(self.id)
            .i32(self.pid)
            .u32(self.uid)
            .u8(self.bound.into())
            .u32(self.mirrors)
            .u64(self.shadow_bytes)
            .u64(self.events)
            .str(&self.comm, MAX_NAME)
            .u64(self.faults)
            .u64(self.invalidations);
    }
    fn get_item(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(ClientInfo {
            id: r.u64("id")?,
            pid: r.i32("pid")?,
            uid: r.u32("uid")?,
            bound: bool::get(r, "bound")?,
            mirrors: r.u32("mirrors")?,
            shadow_bytes: r.u64("shadow_bytes")?,
            events: r.u64("events")?,
            comm: r.str("comm", MAX_NAME)?,
            faults: r.u64("faults")?,
            invalidations: r.u64("invalidations")?,
        })
    }
}

impl Item for MirrorInfo {
    const MIN_LEN: usize = 32 + 4 + 8 + 2;
    fn put_item(&self, w: &mut Writer) {
        w.u64(self.id)
            .u64(self.addr)
            .u64(self.len)
            .u64(self.pages)
            .i32(self.pid)
            .u64(self.seq)
            .str(&self.state, MAX_NAME);
    }
    fn get_item(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(MirrorInfo {
            id: r.u64("id")?,
            addr: r.u64("addr")?,
            len: r.u64("len")?,
            pages: r.u64("pages")?,
            pid: r.i32("pid")?,
            seq: r.u64("seq")?,
            state: r.str("state", MAX_NAME)?,
        })
    }
}

impl Item for EngineInfo {
    const MIN_LEN: usize = 4 + 4 + 4 + 8 * 5 + 4 + 4 + 8 * 3 + 2;
    fn put_item(&self, w: &mut Writer) {
        w.u32(self.id)
            .i32(self.pid)
            .i32(self.client_pid)
            .u64(self.mirror_id)
            .u64(self.flushes)
            .u64(self.depth)
            .u64(self.tlb_entries)
            .u64(self.acks)
            .u32(self.ack_p50_us)
            .u32(self.ack_p99_us)
            .u64(self.overflows)
            .u64(self.faults)
            .u64(self.writes)
            .str(&self.state, MAX_NAME);
    }
    fn get_item(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(EngineInfo {
            id: r.u32("id")?,
            pid: r.i32("pid")?,
            client_pid: r.i32("client_pid")?,
            mirror_id: r.u64("mirror_id")?,
            flushes: r.u64("flushes")?,
            depth: r.u64("depth")?,
            tlb_entries: r.u64("tlb_entries")?,
            acks: r.u64("acks")?,
            ack_p50_us: r.u32("ack_p50_us")?,
            ack_p99_us: r.u32("ack_p99_us")?,
            overflows: r.u64("overflows")?,
            faults: r.u64("faults")?,
            writes: r.u64("writes")?,
            state: r.str("state", MAX_NAME)?,
        })
    }
}

/// A list: a u32 count, then the entries. A list longer than [`MAX_LIST`], or one that
/// does not fit a message, is sent in pieces ([`Response::into_pieces`]); it is never cut.
impl<T: Item> Field for Vec<T> {
    fn put(&self, w: &mut Writer) {
        debug_assert!(self.len() <= MAX_LIST, "a list is sent in pieces");
        let n = self.len().min(MAX_LIST);
        w.u32(n as u32);
        for item in &self[..n] {
            item.put_item(w);
        }
    }
    fn get(r: &mut Reader<'_>, name: &'static str) -> Result<Self, CodecError> {
        let n = r.count(name, MAX_LIST, T::MIN_LEN)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(T::get_item(r)?);
        }
        Ok(v)
    }
}

messages! {
    /// A request, client → daemon (types `0x0001..`).
    pub enum Request {
        /// First message of a session: the versions this client speaks and who it is.
        0x0001 "hello" => Hello {
            /// Oldest version spoken.
            min_version: u16,
            /// Newest version spoken.
            max_version: u16,
            /// A name for logs (program name).
            name: String [MAX_NAME],
        },
        /// Hands over the client's uffd and its `/proc/self/mem` fd (opened for reading),
        /// then (protocol 2) its `/proc/self/maps` fd, then optionally its
        /// `/proc/self/pagemap` fd (for reading) and its `/proc/self/clear_refs` fd (for
        /// writing), in that order, as 2 to 5 `SCM_RIGHTS` fds (protocol 1: uffd, mem and
        /// optionally pagemap).
        0x0002 "bind" fds 2..=5 "2 to 5" => Bind {
            /// What the client claims about its uffd.
            flags: BindFlags,
        },
        /// Mirror `addr..addr+len` of the client's memory.
        0x0003 "attach" => Attach {
            /// First byte (page aligned).
            addr: u64,
            /// Length (page aligned, > 0).
            len: u64,
            /// When the pages the client writes are collected.
            policy: AttachPolicy,
        },
        /// Stop mirroring a range.
        0x0004 "detach" => Detach {
            /// Which.
            mirror_id: u64,
        },
        /// A device read of `len` bytes at `offset` into a mirror, served by an engine.
        0x0005 "read" => Read {
            /// Which mirror.
            mirror_id: u64,
            /// Byte offset into the mirror.
            offset: u64,
            /// Bytes, at most [`MAX_READ`].
            len: u32,
        },
        /// Fault `offset..offset+len` of a mirror into the shadow without returning data.
        0x0006 "populate" => Populate {
            /// Which mirror.
            mirror_id: u64,
            /// Byte offset.
            offset: u64,
            /// Bytes.
            len: u64,
        },
        /// This session's counters.
        0x0007 "client-stats" => ClientStats,
        /// The daemon's settings and counters.
        0x0008 "status" => Status,
        /// Every connected client (root or the daemon's owner only).
        0x0009 "list-clients" => ListClients,
        /// Mirrors of this session (`pid` 0), of the client with that pid, or of every
        /// client (`pid` -1); another client's only for root or the daemon's owner (G7).
        0x000a "list-mirrors" => ListMirrors {
            /// Whose.
            pid: i32,
        },
        /// A device read of another client's shadow at a client address (root or owner).
        0x0010 "peek" => Peek {
            /// The client.
            pid: i32,
            /// First byte (client virtual address).
            addr: u64,
            /// Bytes, at most [`MAX_READ`].
            len: u32,
        },
        /// Injects an invalidation of a client's range, as if its address space had changed
        /// (root, the daemon's owner, or the client itself).
        0x0011 "invalidate" => Invalidate {
            /// The client.
            pid: i32,
            /// First byte.
            addr: u64,
            /// Length in bytes.
            len: u64,
            /// The kind to report.
            event: EventKind,
            /// How.
            flags: InvalidateFlags,
        },
        /// Subscribes this session to a live stream of invalidations: answered by
        /// `TraceStarted`, then one `TraceEvent` per invalidation, all with `FLAG_MORE` and
        /// this request's id, until the session closes. Other clients' events only for root
        /// or the daemon's owner.
        0x0012 "trace" => Trace {
            /// Only this client's (0: every client the caller may see).
            pid: i32,
            /// Bit `code - 1` set for each [`EventKind`] wanted; 0 means all.
            events: u32,
        },
        /// Collects the pages this client wrote in a mirror (or in every mirror,
        /// `mirror_id` 0) and invalidates them, so the next device read returns them.
        0x0020 "sync" => Sync {
            /// Which mirror (0: all of this session's).
            mirror_id: u64,
        },
        /// `Sync` of every mirror of the client with that pid (root, the daemon's owner, or
        /// the client itself; `memshadowctl sync --pid`).
        0x0021 "sync-pid" => SyncPid {
            /// The client.
            pid: i32,
        },
        /// Protocol 3. A grant for an external engine to attach to one of this session's
        /// mirrors: an unguessable token the client hands to the engine by its own means.
        /// The mirror's detach, or the client's exit, revokes it.
        0x0030 "grant" => Grant {
            /// Which mirror.
            mirror_id: u64,
        },
        /// Protocol 3. Makes this session an external engine of a mirror: by `token` (from
        /// `Grant`), or, with `token` 0, by the client's `pid` and `mirror_id` (root and the
        /// daemon's owner only). Answered by `EngineAttached` with the engine's five fds
        /// (see `engine_abi`). A session is at most one engine.
        0x0031 "engine-attach" => EngineAttach {
            /// The grant (0: attach by pid).
            token: u128,
            /// The client, when attaching by pid.
            pid: i32,
            /// The mirror, when attaching by pid.
            mirror_id: u64,
        },
        /// Protocol 3. A read of this session's engine served over the session, from the
        /// client's memory where the shadow cannot hold the pages yet (answered by `Data`).
        0x0035 "engine-read" => EngineRead {
            /// Byte offset into the mirror.
            offset: u64,
            /// Bytes, at most [`MAX_READ`].
            len: u32,
        },
        /// Protocol 3. A device (DMA) write of this session's engine into its client's
        /// memory at `offset` into its mirror, keeping the shadow coherent (answered by
        /// `Written`).
        0x0033 "engine-write" => EngineWrite {
            /// Byte offset into the mirror.
            offset: u64,
            /// The bytes, at most [`MAX_READ`].
            bytes: Vec<u8>,
        },
        /// Protocol 3. Every external engine (root and the daemon's owner), or those
        /// reading the client with that pid (that client too).
        0x0034 "list-engines" => ListEngines {
            /// Whose (0: every client's).
            pid: i32,
        },
        /// Protocol 4. Sets up this bound session's monitors: answered by `MonitorReady`
        /// with the four fds of `monitor_abi` (epoch, generation table, event queue,
        /// doorbell). Again on the same session: the same objects, opened anew.
        0x0040 "monitor-setup" => MonitorSetup,
        /// Protocol 4. Watches `addr..addr+len` (rounded out to pages) of this bound
        /// session's memory: answered by `Monitored` with the monitor's slot and
        /// generation; the daemon bumps that generation when the range is unmapped, moved
        /// or discarded.
        0x0041 "monitor" => Monitor {
            /// First byte.
            addr: u64,
            /// Bytes (not 0).
            len: u64,
        },
        /// Protocol 4. Stops monitor `slot` made with generation `gen` (answered by
        /// `Unmonitored`); its slot may be given to a new monitor afterwards, with a newer
        /// generation.
        0x0042 "unmonitor" => Unmonitor {
            /// The monitor's slot.
            slot: u32,
            /// The generation `Monitored` gave it.
            gen: u64,
        },
        /// Protocol 3. A device fault of this session's engine: faults
        /// `offset..offset+len` of its mirror into the shadow (answered by `Populated`).
        0x0032 "engine-fault" => EngineFault {
            /// Byte offset into the mirror.
            offset: u64,
            /// Bytes.
            len: u64,
        },
    }
}

messages! {
    /// A response, daemon → client (types `0x8001..`), with the `request_id` of the request
    /// it answers. A list response too long for one message comes in pieces, every piece
    /// but the last with `FLAG_MORE` ([`Response::into_pieces`], [`Response::absorb`]).
    pub enum Response {
        /// Answer to `Hello`.
        0x8001 "hello-ack" => HelloAck {
            /// The version chosen for the session.
            version: u16,
            /// The daemon's build version.
            daemon_version: String [MAX_NAME],
            /// The daemon's page size.
            page_size: u32,
            /// Limits and quotas.
            limits: Limits,
        },
        /// Answer to `Bind`.
        0x8002 "bound" => Bound {
            /// How the daemon will read memory.
            access: AccessPath,
            /// Features the uffd handshake granted.
            uffd_features: u64,
        },
        /// Answer to `Attach`.
        0x8003 "attached" => Attached {
            /// The new mirror's id.
            mirror_id: u64,
        },
        /// Answer to `Detach`.
        0x8004 "detached" => Detached,
        /// Answer to `Read`.
        0x8005 "data" => Data {
            /// The bytes.
            bytes: Vec<u8>,
        },
        /// Answer to `Populate`.
        0x8006 "populated" => Populated {
            /// Pages now mirrored in the range.
            pages: u64,
        },
        /// Answer to `ClientStats`: named counters.
        0x8007 "counters" => Counters {
            /// Name → value.
            entries: Vec<(String, u64)>,
        },
        /// Answer to `ListClients`.
        0x8008 "clients" => Clients {
            /// The clients.
            clients: Vec<ClientInfo>,
        },
        /// Answer to `ListMirrors`.
        0x8009 "mirrors" => Mirrors {
            /// The mirrors.
            mirrors: Vec<MirrorInfo>,
        },
        /// Answer to `Status`: settings as text and every counter.
        0x8010 "status-report" => StatusReport {
            /// Name → value (`daemon.version`, `socket`, `device.mode`, …).
            info: Vec<(String, String)>,
            /// Name → value.
            counters: Vec<(String, u64)>,
        },
        /// Answer to `Invalidate`.
        0x8011 "invalidated" => Invalidated {
            /// What it did.
            report: InvalidationReport,
        },
        /// First answer to `Trace`: the stream is open.
        0x8012 "trace-started" => TraceStarted,
        /// One invalidation seen by a `Trace` subscriber.
        0x8013 "trace-event" => TraceEvent {
            /// Records this subscriber lost (it read too slowly) since the previous one.
            dropped: u64,
            /// What happened.
            report: InvalidationReport,
        },
        /// One external engine's acknowledgement that a finish waited for, to a `Trace`
        /// subscriber of protocol 3 whose mask is 0 or has [`TRACE_ENGINE_ACKS`].
        0x8014 "trace-ack" => TraceAck {
            /// Records this subscriber lost (it read too slowly) since the previous one.
            dropped: u64,
            /// The wait.
            ack: AckReport,
        },
        /// Answer to `Sync` and `SyncPid`.
        0x8020 "synced" => Synced {
            /// What the collection did.
            report: SyncReport,
        },
        /// Answer to `Grant`.
        0x8030 "granted" => Granted {
            /// The token (never 0).
            token: u128,
        },
        /// Answer to `EngineWrite`.
        0x8033 "written" => Written {
            /// Bytes written.
            len: u32,
        },
        /// Answer to `ListEngines`.
        0x8034 "engines" => Engines {
            /// The engines.
            engines: Vec<EngineInfo>,
        },
        /// Answer to `EngineAttach`, with the engine's five fds in the order
        /// `engine_abi` gives.
        0x8031 "engine-attached" fds 5..=5 "5" => EngineAttached {
            /// The engine's id (unique in the daemon's run).
            engine_id: u32,
            /// The mirror's id within its client.
            mirror_id: u64,
            /// Client virtual address of the mirror's first byte.
            addr: u64,
            /// The mirror's length in bytes.
            len: u64,
            /// Bytes of the shadow mapping.
            shadow_bytes: u64,
            /// The daemon's page size.
            page_size: u32,
        },
        /// Answer to `MonitorSetup`, with the four fds of `monitor_abi`.
        0x8040 "monitor-ready" fds 4..=4 "4" => MonitorReady {
            /// Slots of the generation table (monitors this client may have at once).
            slots: u32,
            /// Entries of the event queue.
            queue_entries: u32,
        },
        /// Answer to `Monitor`.
        0x8041 "monitored" => Monitored {
            /// The monitor's slot in the generation table.
            slot: u32,
            /// Its generation now: valid while the slot holds it.
            gen: u64,
            /// The watched range, rounded out to pages: first byte.
            addr: u64,
            /// Its length.
            len: u64,
        },
        /// Answer to `Unmonitor`.
        0x8042 "unmonitored" => Unmonitored,
        /// A refused request.
        0x80ff "error" => Error {
            /// What kind of refusal.
            code: ErrorCode,
            /// A human-readable reason.
            message: String [MAX_MESSAGE],
        },
    }
}

/// Longest message of an error.
pub const MAX_MESSAGE: usize = 1024;

fn payload_err(what: &'static str) -> impl FnOnce(CodecError) -> DecodeError {
    move |source| DecodeError::Payload { what, source }
}

/// Decodes a message of `msg_type` of one direction: fds, fields, nothing left over.
fn decode_as<T>(
    msg_type: u16,
    payload: &[u8],
    fds: usize,
    what: &'static str,
    fds_of: fn(u16) -> (std::ops::RangeInclusive<usize>, &'static str),
    fields: fn(u16, &mut Reader<'_>) -> Result<Option<T>, CodecError>,
    other_knows: fn(u16) -> bool,
) -> Result<T, DecodeError> {
    let mut r = Reader::new(payload);
    let Some(msg) = fields(msg_type, &mut r).map_err(payload_err(what))? else {
        return Err(if other_knows(msg_type) {
            DecodeError::WrongDirection(msg_type)
        } else {
            DecodeError::UnknownType(msg_type)
        });
    };
    let (allowed, want) = fds_of(msg_type);
    if !allowed.contains(&fds) {
        return Err(DecodeError::FdCount {
            msg_type,
            want,
            got: fds,
        });
    }
    r.finish().map_err(payload_err(what))?;
    Ok(msg)
}

impl Request {
    /// Encodes the payload.
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode_fields(&mut w);
        w.into_bytes()
    }

    /// Decodes a request of type `msg_type` that arrived with `fds` file descriptors.
    pub fn decode(msg_type: u16, payload: &[u8], fds: usize) -> Result<Request, DecodeError> {
        decode_as(
            msg_type,
            payload,
            fds,
            "request",
            Request::fds,
            Request::decode_fields,
            Response::known,
        )
    }
}

impl Response {
    /// Shorthand for an error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error {
            code,
            message: message.into(),
        }
    }

    /// Encodes the payload. A list response must fit one message: send a long one with
    /// [`Response::into_pieces`].
    pub fn encode_payload(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.encode_fields(&mut w);
        let bytes = w.into_bytes();
        debug_assert!(bytes.len() <= MAX_PAYLOAD, "{} too large", self.name());
        bytes
    }

    /// Decodes a response of type `msg_type` that arrived with `fds` file descriptors.
    pub fn decode(msg_type: u16, payload: &[u8], fds: usize) -> Result<Response, DecodeError> {
        decode_as(
            msg_type,
            payload,
            fds,
            "response",
            Response::fds,
            Response::decode_fields,
            Request::known,
        )
    }

    /// The response in pieces that each fit one message (a list of at most [`MAX_LIST`]
    /// entries and [`MAX_PAYLOAD`] bytes): one piece for anything but a long list. Send
    /// every piece but the last with `FLAG_MORE`; the receiver puts them together again
    /// with [`Response::absorb`].
    pub fn into_pieces(self) -> Vec<Response> {
        match self {
            Response::Counters { entries } => {
                pieces(entries, |entries| Response::Counters { entries })
            }
            Response::Clients { clients } => {
                pieces(clients, |clients| Response::Clients { clients })
            }
            Response::Mirrors { mirrors } => {
                pieces(mirrors, |mirrors| Response::Mirrors { mirrors })
            }
            Response::Engines { engines } => {
                pieces(engines, |engines| Response::Engines { engines })
            }
            Response::StatusReport { info, counters } => {
                // Only a report longer than one message goes in pieces.
                let len = 8 + items_len(&info) + items_len(&counters);
                if len <= MAX_PAYLOAD && info.len() <= MAX_LIST && counters.len() <= MAX_LIST {
                    return vec![Response::StatusReport { info, counters }];
                }
                let mut v = pieces(info, |info| Response::StatusReport {
                    info,
                    counters: Vec::new(),
                });
                v.extend(pieces(counters, |counters| Response::StatusReport {
                    info: Vec::new(),
                    counters,
                }));
                v
            }
            r => vec![r],
        }
    }

    /// Adds `more`, the next piece of the same list response, to this one; false (and
    /// nothing changed) if it is not a piece of the same kind.
    pub fn absorb(&mut self, more: Response) -> bool {
        match (self, more) {
            (Response::Counters { entries }, Response::Counters { entries: m }) => {
                entries.extend(m)
            }
            (Response::Clients { clients }, Response::Clients { clients: m }) => clients.extend(m),
            (Response::Mirrors { mirrors }, Response::Mirrors { mirrors: m }) => mirrors.extend(m),
            (Response::Engines { engines }, Response::Engines { engines: m }) => engines.extend(m),
            (
                Response::StatusReport { info, counters },
                Response::StatusReport {
                    info: i,
                    counters: c,
                },
            ) => {
                info.extend(i);
                counters.extend(c);
            }
            _ => return false,
        }
        true
    }
}

/// The encoded length of `items`, without the count.
fn items_len<T: Item>(items: &[T]) -> usize {
    let mut w = Writer::new();
    for item in items {
        item.put_item(&mut w);
    }
    w.into_bytes().len()
}

/// `items` cut into lists that each fit one message, wrapped by `wrap`; at least one (an
/// empty list is one empty piece).
fn pieces<T: Item>(items: Vec<T>, wrap: impl Fn(Vec<T>) -> Response) -> Vec<Response> {
    // Room for the header-less payload, less the count and the other lists' counts.
    const ROOM: usize = MAX_PAYLOAD - 16;
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut len = 0;
    for item in items {
        let mut w = Writer::new();
        item.put_item(&mut w);
        let n = w.into_bytes().len();
        if !cur.is_empty() && (cur.len() == MAX_LIST || len + n > ROOM) {
            out.push(wrap(std::mem::take(&mut cur)));
            len = 0;
        }
        len += n;
        cur.push(item);
    }
    out.push(wrap(cur));
    out
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
    /// Protocol 3: no grant with that token (wrong, revoked, or given to another user).
    NoSuchGrant,
    /// Protocol 3: this engine was evicted (it did not acknowledge a flush in time).
    Evicted,
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
            ErrorCode::NoSuchGrant => 20,
            ErrorCode::Evicted => 21,
            ErrorCode::Other(c) => c,
        }
    }

    /// From the wire value.
    pub fn from_code(c: u16) -> ErrorCode {
        const KNOWN: [ErrorCode; 21] = [
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
            ErrorCode::NoSuchGrant,
            ErrorCode::Evicted,
        ];
        KNOWN
            .into_iter()
            .find(|k| k.code() == c)
            .unwrap_or(ErrorCode::Other(c))
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
            (
                Request::Bind {
                    flags: BindFlags::empty(),
                },
                2,
            ),
            (
                Request::Bind {
                    flags: BindFlags::empty(),
                },
                3,
            ),
            (
                Request::Attach {
                    addr: 0x7f00_0000_0000,
                    len: 1 << 20,
                    policy: AttachPolicy::Default,
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
                    flags: InvalidateFlags::NON_BLOCKING,
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
                    flags: BindFlags::UFFD_PRIVILEGED,
                },
                3,
            ),
            (
                Request::Attach {
                    addr: 0x7f00_0000_0000,
                    len: 1 << 21,
                    policy: AttachPolicy::Periodic { period_ms: 250 },
                },
                0,
            ),
            (Request::Sync { mirror_id: 0 }, 0),
            (Request::Sync { mirror_id: 7 }, 0),
            (Request::SyncPid { pid: 4242 }, 0),
            (Request::MonitorSetup, 0),
            (
                Request::Monitor {
                    addr: 0x7f00_0000_1010,
                    len: 100,
                },
                0,
            ),
            (Request::Unmonitor { slot: 3, gen: 9 }, 0),
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
                Response::decode(0x8020, &p, 0),
                Ok(Response::Synced { report }) if report.backend == b
            ));
        }
        for bad in [0u8, 4, 255] {
            let mut p = payload.clone();
            p[0] = bad;
            assert!(matches!(
                Response::decode(0x8020, &p, 0),
                Err(DecodeError::Payload { .. })
            ));
        }
    }

    #[test]
    fn attach_policies_round_trip_through_flags() {
        for p in [
            AttachPolicy::Default,
            AttachPolicy::Manual,
            AttachPolicy::Lazy,
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
        // A period without the periodic kind, periodic without a period, stray bits,
        // arming at the first sync with a kind other than manual.
        let arm = ATTACH_ARM_AT_SYNC;
        for bad in [
            1 | (5 << ATTACH_PERIOD_SHIFT),
            3,
            arm,
            0x80,
            2 | 0x10,
            2 | arm,
            3 | arm | (5 << ATTACH_PERIOD_SHIFT),
        ] {
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
    fn ack_report_has_a_fixed_size_and_refuses_unknown_outcomes() {
        let resp = Response::TraceAck {
            dropped: 1,
            ack: AckReport {
                pid: 1,
                engine_id: 2,
                engine_pid: 3,
                seq: 4,
                wait_ns: 5,
                outcome: AckOutcome::Acknowledged,
            },
        };
        let mut payload = resp.encode_payload();
        assert_eq!(payload.len(), 8 + AckReport::WIRE_LEN);
        for (code, outcome) in [
            (1, AckOutcome::Acknowledged),
            (2, AckOutcome::Gone),
            (3, AckOutcome::Evicted),
        ] {
            assert_eq!(outcome.code(), code);
        }
        let last = payload.len() - 1;
        for bad in [0u8, 4, 255] {
            payload[last] = bad;
            assert!(
                Response::decode(resp.msg_type(), &payload, 0).is_err(),
                "{bad}"
            );
        }
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
            Response::TraceAck {
                dropped: 0,
                ack: AckReport {
                    pid: 77,
                    engine_id: 17,
                    engine_pid: 78,
                    seq: 9,
                    wait_ns: 12_345,
                    outcome: AckOutcome::Evicted,
                },
            },
            Response::error(ErrorCode::QuotaExceeded, "shadow quota of 1 GiB reached"),
            Response::error(ErrorCode::Other(999), "from the future"),
            Response::Synced {
                report: sync_report(),
            },
            Response::error(ErrorCode::Unsupported, "dirty tracking is off"),
            Response::Monitored {
                slot: 3,
                gen: 9,
                addr: 0x7f00_0000_1000,
                len: 4096,
            },
            Response::Unmonitored,
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

    /// A list answer that fits one message is sent as one (docs/protocol.md, "Answers in
    /// pieces"): a peer that does not put pieces together still reads it whole.
    #[test]
    fn an_answer_that_fits_is_one_piece() {
        for resp in responses() {
            assert_eq!(resp.clone().into_pieces(), vec![resp]);
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
        let bind = Request::Bind {
            flags: BindFlags::empty(),
        };
        assert!(matches!(
            Request::decode(bind.msg_type(), &bind.encode_payload(), 1),
            Err(DecodeError::FdCount { got: 1, .. })
        ));
        assert!(matches!(
            Request::decode(bind.msg_type(), &bind.encode_payload(), 6),
            Err(DecodeError::FdCount { .. })
        ));
        assert!(matches!(
            Request::decode(0x0008, &[], 1),
            Err(DecodeError::FdCount { .. })
        ));
        assert_eq!(
            Request::decode(0x0077, &[], 0),
            Err(DecodeError::UnknownType(0x0077))
        );
        assert_eq!(
            Request::decode(0x8004, &[], 0),
            Err(DecodeError::WrongDirection(0x8004))
        );
        assert_eq!(
            Response::decode(0x0008, &[], 0),
            Err(DecodeError::WrongDirection(0x0008))
        );
        assert_eq!(
            Response::decode(0x8077, &[], 0),
            Err(DecodeError::UnknownType(0x8077))
        );
        assert!(matches!(
            Request::decode(0x0008, &[0], 0),
            Err(DecodeError::Payload { .. })
        ));
        assert!(matches!(
            Request::decode(0x0004, &[0; 7], 0),
            Err(DecodeError::Payload { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Arbitrary bytes of any type never panic, and what decodes re-encodes to itself.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(msg_type in prop_oneof![0u16..0x14, 0x8000u16..0x8015, 0x001eu16..0x0024, 0x801eu16..0x8024, 0x0040u16..0x0043, 0x8040u16..0x8043, Just(0x80ffu16), any::<u16>()],
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
