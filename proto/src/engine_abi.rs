//! The memory an external engine shares with the daemon (docs/engines.md): the layouts both
//! sides agree on, fixed here once and checked at compile time.
//!
//! An attached engine receives five fds, in this order ([`ENGINE_FDS`]):
//!
//! 0. the client's **epoch page** ([`EpochPage`], one page, read-only);
//! 1. the mirror's **page table** ([`PtHeader`] then one [`u64`] word per page of the
//!    mirror, read-only), written only by the daemon;
//! 2. the client's **shadow** (slot `s` at byte `s * page_size`, read-only): that client's
//!    pages and no other's;
//! 3. the engine's **flush ring** ([`RingHeader`] then [`RingEntry`]s, read-write: the engine
//!    writes only [`RingHeader::ack`]);
//! 4. the ring's **doorbell**, the read end of a pipe the daemon writes a byte into after it
//!    queued flushes (a pipe, not an eventfd: the engine cannot make the daemon's write
//!    block, since the write end is a file of the daemon's own).
//!
//! The read-only ones are opened read-only by the daemon, so the kernel refuses a writable
//! mapping of them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Version of these layouts; bumped on any change.
pub const ENGINE_ABI_VERSION: u32 = 1;
/// `EpochPage::magic`.
pub const EPOCH_MAGIC: u32 = 0x6d73_6570; // "msep"
/// `PtHeader::magic`.
pub const PT_MAGIC: u32 = 0x6d73_7074; // "mspt"
/// `RingHeader::magic`.
pub const RING_MAGIC: u32 = 0x6d73_7267; // "msrg"
/// How many fds an `EngineAttached` answer carries.
pub const ENGINE_FDS: usize = 5;
/// Bytes before the first page-table word and the first ring entry.
pub const HEADER_BYTES: usize = 4096;
/// Entries of a flush ring (a power of two).
pub const RING_ENTRIES: u32 = 256;

/// The client's event-read epoch. **Odd** while the daemon may have read an address-space
/// event of the client whose start pass has not zapped its page-table words yet; an engine
/// access is a seqlock read against it (see `Engine::read` in the client library).
#[repr(C, align(64))]
#[derive(Debug)]
pub struct EpochPage {
    /// [`EPOCH_MAGIC`].
    pub magic: u32,
    /// [`ENGINE_ABI_VERSION`].
    pub version: u32,
    /// The epoch.
    pub epoch: AtomicU64,
}

/// The head of a mirror's page table.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct PtHeader {
    /// [`PT_MAGIC`].
    pub magic: u32,
    /// [`ENGINE_ABI_VERSION`].
    pub version: u32,
    /// Client virtual address of the mirror's first byte.
    pub addr: u64,
    /// Pages of the mirror (words that follow the header).
    pub pages: u64,
    /// The daemon's page size.
    pub page_size: u64,
}

/// Bit 0 of a page-table word: the page is in the shadow.
pub const PTE_VALID: u64 = 1;

/// A page-table word: valid, the slot (bits 32..64) and the low 31 bits of the slot's
/// generation (bits 1..32).
pub const fn pte_word(slot: u32, gen: u32) -> u64 {
    ((slot as u64) << 32) | (((gen & 0x7fff_ffff) as u64) << 1) | PTE_VALID
}

/// The slot of a valid page-table word.
pub const fn pte_slot(word: u64) -> u32 {
    (word >> 32) as u32
}

/// The head of an engine's flush ring. The daemon queues request `s` (sequence numbers
/// start at 1) in entry `s % RING_ENTRIES`, then publishes `head = s` (release); a request
/// to drop *every* translation of the client goes into `flush_all` instead (its sequence
/// number), used when the ring is full. The engine, after it dropped the translations of
/// every request up to `s` **and** every access that could have used them has finished,
/// stores `ack = s` (release) and wakes the futex on `ack`'s low 32 bits.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct RingHeader {
    /// [`RING_MAGIC`].
    pub magic: u32,
    /// [`ENGINE_ABI_VERSION`].
    pub version: u32,
    /// Entries in the ring ([`RING_ENTRIES`]).
    pub entries: u32,
    /// The engine's id (for its own messages).
    pub engine_id: u32,
    /// Daemon: the sequence number of the last request queued.
    pub head: AtomicU64,
    /// Daemon: the sequence number of the last "flush all" request (0: none yet).
    pub flush_all: AtomicU64,
    /// Daemon: 1 once the engine was evicted (its flushes no longer waited for).
    pub evicted: AtomicU64,
    /// Engine: the translations its TLB holds, as of its last acknowledgement or fault
    /// (informational: `memshadowctl engines` shows it; the daemon trusts nothing of it).
    pub tlb: AtomicU64,
    _pad: [u64; 2],
    /// Engine: the last sequence number acknowledged (futex on its low half).
    pub ack: AtomicU64,
}

/// One flush request: drop translations of client virtual pages `first..=last`.
#[repr(C)]
#[derive(Debug)]
pub struct RingEntry {
    /// The request's sequence number (written last).
    pub seq: AtomicU64,
    /// First virtual page number.
    pub first: AtomicU64,
    /// Last virtual page number (inclusive).
    pub last: AtomicU64,
    _pad: u64,
}

const _: () = {
    assert!(std::mem::size_of::<EpochPage>() == 64);
    assert!(std::mem::size_of::<PtHeader>() == 64);
    assert!(std::mem::size_of::<RingHeader>() == 128);
    assert!(std::mem::offset_of!(RingHeader, head) == 16);
    assert!(std::mem::offset_of!(RingHeader, flush_all) == 24);
    assert!(std::mem::offset_of!(RingHeader, evicted) == 32);
    assert!(std::mem::offset_of!(RingHeader, tlb) == 40);
    assert!(std::mem::offset_of!(RingHeader, ack) == 64);
    assert!(std::mem::size_of::<RingEntry>() == 32);
    assert!(RING_ENTRIES.is_power_of_two());
    // The futex on `ack` waits on its low half, which must be at its address.
    assert!(cfg!(target_endian = "little"));
};

/// Bytes of a ring mapping.
pub const fn ring_bytes() -> usize {
    HEADER_BYTES + RING_ENTRIES as usize * std::mem::size_of::<RingEntry>()
}

/// Bytes of a page-table mapping of `pages` pages.
pub const fn pt_bytes(pages: u64) -> u64 {
    HEADER_BYTES as u64 + pages * 8
}

impl RingEntry {
    /// Reads entry for sequence `seq`: `Some((first, last))` if it holds that request.
    ///
    /// A seqlock read: a daemon overwrites an entry only after the engine acknowledged the
    /// request in it, so a changed `seq` means the engine acknowledged too early; it gets
    /// nothing rather than a mix (and should flush everything).
    pub fn read(&self, seq: u64) -> Option<(u64, u64)> {
        if self.seq.load(Ordering::Acquire) != seq {
            return None;
        }
        let r = (
            self.first.load(Ordering::Relaxed),
            self.last.load(Ordering::Relaxed),
        );
        std::sync::atomic::fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == seq).then_some(r)
    }

    /// Daemon: writes request `seq` into the entry (`seq` is 0 while it is written).
    pub fn write(&self, seq: u64, first: u64, last: u64) {
        self.seq.store(0, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        self.first.store(first, Ordering::Relaxed);
        self.last.store(last, Ordering::Relaxed);
        self.seq.store(seq, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_keeps_its_slot_and_is_valid() {
        let w = pte_word(0xdead_beef, 0xffff_ffff);
        assert_eq!(pte_slot(w), 0xdead_beef);
        assert_eq!(w & PTE_VALID, 1);
        assert_eq!(pte_word(0, 0), 1);
    }

    #[test]
    fn an_entry_reads_only_the_request_it_holds() {
        let e = RingEntry {
            seq: AtomicU64::new(0),
            first: AtomicU64::new(0),
            last: AtomicU64::new(0),
            _pad: 0,
        };
        e.write(7, 10, 20);
        assert_eq!(e.read(7), Some((10, 20)));
        assert_eq!(e.read(8), None);
    }
}
