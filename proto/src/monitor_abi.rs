//! The memory a client shares with the daemon for its **monitors** (docs/monitors.md): the
//! layouts both sides agree on, fixed here once and checked at compile time.
//!
//! A `MonitorSetup` answer carries four fds, in this order ([`MONITOR_FDS`]):
//!
//! 0. the client's **epoch page** (`engine_abi::EpochPage`, one page, read-only), the same
//!    page the client's external engines map;
//! 1. the **generation table** ([`GenHeader`] then one [`u64`] generation per monitor
//!    slot, read-only), written only by the daemon;
//! 2. the **event queue** ([`QueueHeader`] then [`QueueEntry`]s, read-write: the client
//!    writes only [`QueueHeader::tail`]);
//! 3. the queue's **doorbell**, the read end of a pipe the daemon writes a byte into when it
//!    queued an event for
//!    a reader that had caught up.
//!
//! A monitor is valid while its slot's generation equals the one it was given when it was
//! made; the daemon bumps the generation (release) in the start pass of every invalidation
//! that covers the monitor, before the epoch turns even again.

use std::sync::atomic::{AtomicU32, AtomicU64};

/// Version of these layouts; bumped on any change.
pub const MONITOR_ABI_VERSION: u32 = 1;
/// `GenHeader::magic`.
pub const GEN_MAGIC: u32 = 0x6d73_6d67; // "msmg"
/// `QueueHeader::magic`.
pub const QUEUE_MAGIC: u32 = 0x6d73_6d71; // "msmq"
/// How many fds a `MonitorReady` answer carries.
pub const MONITOR_FDS: usize = 4;
/// Bytes before the first generation and the first queue entry.
pub const HEADER_BYTES: usize = 64;
/// Monitors one client may have at once (slots of its generation table).
pub const MAX_MONITORS: u32 = 1 << 17;
/// Entries of the event queue (a power of two).
pub const QUEUE_ENTRIES: u32 = 4096;

/// The head of the generation table.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct GenHeader {
    /// [`GEN_MAGIC`].
    pub magic: u32,
    /// [`MONITOR_ABI_VERSION`].
    pub version: u32,
    /// Slots that follow ([`MAX_MONITORS`]).
    pub slots: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// The head of the event queue. The daemon writes entry `s` (sequence numbers start at 1)
/// in slot `s % QUEUE_ENTRIES`, stores its `seq` last (release), then `head = s`; it never
/// writes an entry the client has not consumed (`head - tail < QUEUE_ENTRIES`): it counts
/// an overflow instead, and the client re-checks every monitor's generation.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct QueueHeader {
    /// [`QUEUE_MAGIC`].
    pub magic: u32,
    /// [`MONITOR_ABI_VERSION`].
    pub version: u32,
    /// [`QUEUE_ENTRIES`].
    pub entries: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Last sequence number written (daemon).
    pub head: AtomicU64,
    /// Last sequence number consumed (the client).
    pub tail: AtomicU64,
    /// Events that found the queue full and were dropped (daemon).
    pub overflows: AtomicU64,
}

/// One event: monitor `slot` was invalidated, its generation is now `gen`.
#[repr(C)]
#[derive(Debug)]
pub struct QueueEntry {
    /// The sequence number this entry holds (stored last).
    pub seq: AtomicU64,
    /// The monitor's new generation.
    pub gen: AtomicU64,
    /// First byte of the invalidated part of the monitor.
    pub start: AtomicU64,
    /// One past its last byte.
    pub end: AtomicU64,
    /// The monitor's slot.
    pub slot: AtomicU32,
    /// The event kind (`EventKind::code`).
    pub kind: AtomicU32,
}

/// Bytes of the generation table.
pub const fn gen_table_bytes() -> usize {
    HEADER_BYTES + MAX_MONITORS as usize * 8
}

/// Bytes of the event queue.
pub const fn queue_bytes() -> usize {
    HEADER_BYTES + QUEUE_ENTRIES as usize * std::mem::size_of::<QueueEntry>()
}

const _: () = {
    assert!(std::mem::size_of::<GenHeader>() == HEADER_BYTES);
    assert!(std::mem::size_of::<QueueHeader>() == HEADER_BYTES);
    assert!(std::mem::size_of::<QueueEntry>() == 40);
    assert!(std::mem::align_of::<QueueEntry>() == 8);
    assert!(QUEUE_ENTRIES.is_power_of_two());
    assert!(HEADER_BYTES % 8 == 0);
};
