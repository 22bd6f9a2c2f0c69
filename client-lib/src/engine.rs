//! External engines (protocol 3; docs/design.md §8): an [`Engine`] is a process, or a thread,
//! that reads a client's mirrored memory itself, at memory speed, instead of asking the
//! daemon for every read. The daemon hands it five fds (`engine_abi`): the client's epoch
//! page, the mirror's page table and the client's shadow (all read-only), a flush ring
//! (read-write: the engine writes only `ack`) and the ring's doorbell, a pipe's read end.
//!
//! # The contract an engine keeps
//!
//! **Translations.** The page table has one word per page of the mirror, written only by the
//! daemon: valid, the shadow slot holding the page, and the slot's generation. The engine
//! keeps the translations it read in a private TLB (here: direct-mapped, [`TLB_ENTRIES`]
//! entries indexed by the low bits of the client's virtual page number, tagged with the whole
//! number; a conflict evicts, which costs a page-table read, never correctness). A
//! translation stays usable until the daemon asks, through the ring, for it to be dropped.
//!
//! **Flushes and G2.** Before the daemon hands a slot to another page it zaps the words
//! that name it, posts a flush of those pages to every engine's ring, and waits until each
//! engine has *acknowledged* a sequence number at or past that flush. An acknowledgement of
//! `s` promises that every translation named by the requests up to `s` is dropped **and** that
//! no access that could have used one is still running. This engine acknowledges only in
//! [`Engine::poll`] (which [`Engine::read`] also runs, before it translates anything), that is
//! between two accesses, never during a copy: so a slot a read copies from cannot be reused
//! under that read (G2). A request that cannot be read back (overwritten, or a "flush all" of a
//! full ring, which has its own word) drops every translation.
//!
//! **The epoch seqlock (G1 outside the daemon).** A client's `munmap` returns as soon as the
//! daemon has *read* the event, before the daemon zapped anything. So the daemon makes the
//! client's epoch odd before it reads events, and even again only after the start passes of
//! the events it read have zapped their words and posted their flushes. The daemon's odd
//! store happens before its `read()` of the event, which happens before the kernel lets the
//! `munmap` return: a read that *began* after the `munmap` returned therefore sees the epoch
//! odd (and waits), or a later even value whose store came after the words were cleared and
//! the flushes were posted (so its `poll` drops the stale translations and its page-table
//! reads find the words clear). A read that began earlier and overlapped the change sees the
//! epoch moved when it re-checks it after the copy, and starts again. That is why
//! [`Engine::read`] is the loop: load epoch (wait while odd), poll, translate (faulting in
//! missing runs with `EngineFault`, then starting again), copy, re-check the epoch.
//!
//! **Eviction.** An engine that does not acknowledge in time is evicted: the daemon stops
//! waiting for it and sets the ring's `evicted` word, and [`Engine::poll`] and
//! [`Engine::read`] then fail with [`Error::Evicted`]. An evicted engine still has its
//! mapping of the shadow, so a read that raced with the eviction may have returned stale
//! bytes, or bytes of a slot reused for another page, **of the same client only**: the shadow
//! it maps holds that client's pages and no other's (G7). User space cannot do better.
//!
//! An engine is `Send` (hand it to the thread that uses it) but not shared: its TLB and ring
//! position are its own. Dropping it closes its session; the daemon then counts it as having
//! acknowledged everything.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::ptr;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};
use memshadow_proto::engine_abi::{
    self as abi, EpochPage, PtHeader, RingEntry, RingHeader, ENGINE_ABI_VERSION, ENGINE_FDS,
    EPOCH_MAGIC, PTE_VALID, PT_MAGIC, RING_ENTRIES, RING_MAGIC,
};
use memshadow_proto::{Request, Response};

use crate::{unexpected, Builder, Client, Error, Inner};

/// The protocol version that brought external engines.
const ENGINE_PROTOCOL: u16 = 3;
/// Entries of an engine's TLB (direct-mapped; a power of two).
/// Bytes to copy from the shadow (`src`, a byte offset in it) into a read's buffer (`dst`).
#[derive(Debug, Clone, Copy)]
struct CopyRun {
    src: usize,
    dst: usize,
    len: usize,
}

/// The slot of a page whose bytes a read already has (fetched over the session).
const FETCHED: u32 = u32::MAX - 1;

pub const TLB_ENTRIES: usize = 512;
/// Bytes of the epoch page mapping.
pub(crate) const EPOCH_BYTES: usize = 4096;
/// Spins on an odd epoch between two `yield_now`s.
const SPINS_BEFORE_YIELD: u32 = 1000;
/// How long the epoch may stay odd before a read gives up: the daemon seems stuck.
pub(crate) const STUCK_AFTER: Duration = Duration::from_secs(10);
/// Passes of a read that may fault before it gives up: the range keeps faulting.
const MAX_FAULT_PASSES: u32 = 1000;

/// Refuses with `Unsupported` a session whose daemon does not speak protocol 3.
pub(crate) fn need_engines(inner: &Inner) -> Result<(), Error> {
    if inner.version >= ENGINE_PROTOCOL {
        Ok(())
    } else {
        Err(Error::Unsupported(format!(
            "external engines need protocol {ENGINE_PROTOCOL}; the daemon speaks {}",
            inner.version
        )))
    }
}

/// What an engine counted since it attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineStats {
    /// Page translations found in the TLB.
    pub tlb_hits: u64,
    /// Page translations not in the TLB (looked up in the page table).
    pub tlb_misses: u64,
    /// `EngineFault` requests sent (one per missing run).
    pub faults: u64,
    /// Flush requests of the ring handled (acknowledged).
    pub flushes_processed: u64,
    /// Times a read started again (after faults, or because the epoch moved).
    pub retries: u64,
    /// Pieces of reads served over the session (`EngineRead`): pages the daemon could not
    /// install in the shadow yet (discarded by the client, not zapped yet).
    pub fetches: u64,
}

/// An external engine of one mirror: reads the client's mirrored memory straight from the
/// shadow, through its own TLB, keeping the contract the [module documentation](self)
/// explains.
///
/// ```no_run
/// # fn main() -> Result<(), memshadow::Error> {
/// # let token: u128 = 1;
/// // `token` came from the client's `Mirror::grant`, by whatever means.
/// let mut engine = memshadow::Engine::attach(None, token)?;
/// let mut out = [0u8; 64];
/// engine.read(4096, &mut out)?;  // no system call when the pages are in the shadow
/// engine.poll()?;                // when engine.fd() is readable: acknowledge flushes
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Engine {
    maps: Maps,
    doorbell: OwnedFd,
    /// The doorbell's open file is `O_NONBLOCK` (else it is polled before it is read).
    doorbell_nonblocking: bool,
    engine_id: u32,
    mirror_id: u64,
    addr: u64,
    len: u64,
    page_shift: u32,
    /// The client's virtual page number of the mirror's first page.
    base_vpn: u64,
    tlb: Tlb,
    /// The last sequence number this engine acknowledged.
    acked: u64,
    /// The last "flush all" sequence number handled.
    flush_all_seen: u64,
    stats: EngineStats,
    stuck_after: Duration,
    /// Scratch of a read: the slot of every page of the range.
    slots: Vec<u32>,
    /// Scratch of a read: missing runs, (first page, pages).
    runs: Vec<(u64, u64)>,
    /// The control session (its close tells the daemon this engine is gone). Last, so it
    /// closes after the mappings are gone.
    session: Inner,
}

impl Engine {
    /// Attaches, as an engine, to the mirror `token` grants ([`crate::Mirror::grant`]), on
    /// a control session of its own opened at `socket` or at the socket
    /// [`crate::socket_path`] finds. [`Error::NoSuchGrant`] if the token is wrong, revoked or
    /// another user's.
    pub fn attach(socket: Option<&Path>, token: u128) -> Result<Engine, Error> {
        if token == 0 {
            return Err(Error::InvalidArgument("a grant token is never 0".into()));
        }
        Engine::attach_with(builder(socket), token, 0, 0)
    }

    /// Attaches, as an engine, to mirror `mirror_id` of client `pid` (root and the daemon's
    /// owner only), on a control session of its own as [`Engine::attach`] opens it.
    pub fn attach_pid(socket: Option<&Path>, pid: i32, mirror_id: u64) -> Result<Engine, Error> {
        if pid <= 0 {
            return Err(Error::NoSuchClient(format!("no client has pid {pid}")));
        }
        Engine::attach_with(builder(socket), 0, pid, mirror_id)
    }

    /// Opens the session `b` says, sends `EngineAttach`, maps and checks what came back.
    pub(crate) fn attach_with(
        b: Builder,
        token: u128,
        pid: i32,
        mirror_id: u64,
    ) -> Result<Engine, Error> {
        let session = b.open(false)?;
        need_engines(&session)?;
        let req = Request::EngineAttach {
            token,
            pid,
            mirror_id,
        };
        let (resp, fds) = session.call_fds(&req)?;
        let Response::EngineAttached {
            engine_id,
            mirror_id: got_mirror,
            addr,
            len,
            shadow_bytes,
            page_size,
        } = resp
        else {
            return Err(unexpected(resp));
        };
        let fds: [OwnedFd; ENGINE_FDS] = fds.try_into().map_err(|v: Vec<OwnedFd>| {
            Error::Protocol(format!(
                "EngineAttached with {} fds, not {ENGINE_FDS}",
                v.len()
            ))
        })?;
        if token == 0 && got_mirror != mirror_id {
            return Err(Error::Protocol(format!(
                "asked to attach to mirror {mirror_id}, attached to {got_mirror}"
            )));
        }
        let geometry = Geometry::check(addr, len, shadow_bytes, page_size, session.page_size)?;
        let [epoch, pt, shadow, ring, doorbell] = fds;
        let maps = Maps::map(&geometry, &epoch, &pt, &shadow, &ring)?;
        maps.check_headers(&geometry)?;
        let doorbell_nonblocking = check_doorbell(&doorbell)?;
        let ring_header = maps.ring_header();
        // Nothing is cached yet: whatever was posted before is handled trivially.
        let acked = ring_header.ack.load(Ordering::Acquire);
        let flush_all_seen = ring_header.flush_all.load(Ordering::Acquire);
        Ok(Engine {
            maps,
            doorbell,
            doorbell_nonblocking,
            engine_id,
            mirror_id: got_mirror,
            addr,
            len,
            page_shift: page_size.trailing_zeros(),
            base_vpn: addr >> page_size.trailing_zeros(),
            tlb: Tlb::new(),
            acked,
            flush_all_seen,
            stats: EngineStats::default(),
            stuck_after: STUCK_AFTER,
            slots: Vec::new(),
            runs: Vec::new(),
            session,
        })
    }

    /// The engine's id (unique in the daemon's run).
    pub fn engine_id(&self) -> u32 {
        self.engine_id
    }

    /// The mirror's id within its client.
    pub fn mirror_id(&self) -> u64 {
        self.mirror_id
    }

    /// The client's virtual address of the mirror's first byte, when the engine attached.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The mirror's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the mirror is empty (never: the daemon mirrors no empty range).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The daemon's page size.
    pub fn page_size(&self) -> u64 {
        self.maps.page_size
    }

    /// What this engine counted.
    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// The ring's doorbell, a pipe the daemon writes a byte into after it queued flushes:
    /// wait for it
    /// to be readable (epoll, poll), then call [`Engine::poll`]. Do not read it yourself.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.doorbell.as_fd()
    }

    /// Handles the flushes the daemon queued: drops the translations they name and
    /// acknowledges them (waking the daemon if it waits), and drains the doorbell. Call it
    /// when [`Engine::fd`] is readable, between accesses; [`Engine::read`] also handles the
    /// ring (without the doorbell's system call). [`Error::Evicted`] once evicted.
    pub fn poll(&mut self) -> Result<(), Error> {
        self.drain_doorbell();
        self.process_flushes()
    }

    /// A device (DMA) write of `bytes` into the client's memory at `offset` into the
    /// mirror (at most [`memshadow_proto::MAX_READ`] bytes per call). The daemon writes the
    /// client's memory where its mappings are writable, then invalidates the pages written,
    /// so this engine, the others and the client all see the new bytes. The client must
    /// have allowed device writes ([`crate::Builder::device_writes`]). Returns the bytes
    /// written (short where the mapping stops being writable).
    pub fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<usize, Error> {
        let len = bytes.len() as u64;
        if bytes.len() > memshadow_proto::MAX_READ {
            return Err(Error::InvalidArgument(format!(
                "a device write of {len} bytes exceeds {} per call",
                memshadow_proto::MAX_READ
            )));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::BadRange(format!(
                "write of {len:#x} bytes at {offset:#x} is outside the mirror ({:#x} bytes)",
                self.len
            )));
        }
        let req = Request::EngineWrite {
            offset,
            bytes: bytes.to_vec(),
        };
        match self.session.call(&req, &[])? {
            Response::Written { len } => Ok(len as usize),
            r => Err(unexpected(r)),
        }
    }

    /// Stops being an engine: closes the session and unmaps everything (as dropping does).
    pub fn detach(self) {
        drop(self);
    }

    /// Reads `buf.len()` bytes of the mirror at `offset` from the shadow, faulting missing
    /// pages in with `EngineFault` requests (one per missing run). The bytes are those of the
    /// pages at some point during the call, and never older than a `munmap`, `mremap` or
    /// `madvise` of the client that returned before the call began.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let len = buf.len() as u64;
        let end = match offset.checked_add(len) {
            Some(end) if end <= self.len => end,
            _ => {
                return Err(Error::BadRange(format!(
                    "{offset:#x}+{len:#x} is outside the mirror of {:#x} bytes",
                    self.len
                )))
            }
        };
        let shift = self.page_shift;
        let page_size = self.maps.page_size;
        let first_page = offset >> shift;
        let end_page = if len == 0 {
            first_page
        } else {
            ((end - 1) >> shift) + 1
        };
        let mut fault_passes = 0u32;
        let mut spins = 0u32;
        let mut odd_since: Option<Instant> = None;
        loop {
            let e1 = self.maps.epoch_page().epoch.load(Ordering::Acquire);
            if e1 & 1 == 1 {
                wait_odd(&mut spins, &mut odd_since, self.stuck_after)?;
                continue;
            }
            odd_since = None;
            // Drop stale translations and acknowledge, between accesses.
            self.process_flushes()?;

            // Translate every page of the range; note the missing runs.
            self.slots.clear();
            self.runs.clear();
            let words = self.maps.pt_words();
            for page in first_page..end_page {
                let vpn = self.base_vpn + page;
                if let Some(slot) = self.tlb.get(vpn) {
                    self.stats.tlb_hits += 1;
                    self.slots.push(slot);
                    continue;
                }
                self.stats.tlb_misses += 1;
                let word = words[page as usize].load(Ordering::Acquire);
                if word & PTE_VALID != 0 {
                    let slot = abi::pte_slot(word);
                    if u64::from(slot) >= self.maps.slots {
                        return Err(Error::Protocol(format!(
                            "page {page} of the mirror is in slot {slot}, beyond the {} slots \
                             of the shadow",
                            self.maps.slots
                        )));
                    }
                    self.tlb.insert(vpn, slot);
                    self.slots.push(slot);
                } else {
                    self.slots.push(u32::MAX);
                    match self.runs.last_mut() {
                        Some((start, n)) if *start + *n == page => *n += 1,
                        _ => self.runs.push((page, 1)),
                    }
                }
            }
            if !self.runs.is_empty() && fault_passes > 0 {
                // Faulted, and still missing: pages the daemon may not install now (their
                // client discarded them, and the kernel has not zapped them yet as far as
                // it can tell). Their bytes come over the session, from the client's memory.
                self.fetch_runs(offset, end, buf)?;
            }
            if !self.runs.is_empty() {
                let valid = self.tlb.valid as u64;
                self.maps.ring_header().tlb.store(valid, Ordering::Relaxed);
                fault_passes += 1;
                if fault_passes > MAX_FAULT_PASSES {
                    return Err(Error::Protocol(format!(
                        "{offset:#x}+{len:#x} kept faulting: still missing after \
                         {MAX_FAULT_PASSES} faults that the daemon said it served"
                    )));
                }
                for i in 0..self.runs.len() {
                    let (start, pages) = self.runs[i];
                    self.stats.faults += 1;
                    let req = Request::EngineFault {
                        offset: start << shift,
                        len: pages << shift,
                    };
                    match self.call_acknowledging(&req)? {
                        Response::Populated { .. } => {}
                        r => return Err(unexpected(r)),
                    }
                }
                self.stats.retries += 1;
                continue;
            }

            // Copy, one run of adjacent slots at a time (a fault fills adjacent slots).
            let mut done = 0usize;
            let mut run: Option<CopyRun> = None;
            for (i, &slot) in self.slots.iter().enumerate() {
                let page_start = (first_page + i as u64) << shift;
                let from = offset.max(page_start);
                let to = end.min(page_start + page_size);
                let n = (to - from) as usize;
                let at = (u64::from(slot) * page_size + (from - page_start)) as usize;
                let next = match run {
                    _ if slot == FETCHED => None,
                    Some(r) if r.src + r.len == at => Some(CopyRun {
                        len: r.len + n,
                        ..r
                    }),
                    _ => Some(CopyRun {
                        src: at,
                        dst: done,
                        len: n,
                    }),
                };
                if let Some(r) = run.filter(|r| next.is_none_or(|x| x.dst != r.dst)) {
                    self.copy_out(r, buf);
                }
                run = next;
                done += n;
            }
            if let Some(r) = run {
                self.copy_out(r, buf);
            }
            fence(Ordering::Acquire);
            if self.maps.epoch_page().epoch.load(Ordering::Relaxed) != e1 {
                self.stats.retries += 1;
                continue;
            }
            return Ok(());
        }
    }

    /// Copies a run of shadow bytes into `buf`.
    fn copy_out(&self, r: CopyRun, buf: &mut [u8]) {
        assert!(r.src + r.len <= self.maps.shadow.len(), "beyond the shadow");
        let src = self.maps.shadow.as_ptr().wrapping_add(r.src);
        let dst = buf[r.dst..r.dst + r.len].as_mut_ptr();
        // SAFETY: `src..src+len` is inside the shadow mapping (checked above), which lives as
        // long as `self`; `dst..dst+len` is inside `buf`, which we borrow mutably, so the two
        // cannot overlap. The slots cannot be reused for other pages until this engine
        // acknowledges the flush that removes their translations, which it only does between
        // accesses (G2). The daemon may still write a slot meanwhile (another process); the
        // bytes are plain `u8`s, any value is valid, and the epoch check decides whether they
        // are used.
        unsafe { ptr::copy_nonoverlapping(src, dst, r.len) };
    }

    /// Reads the bytes of the missing runs of a read of `offset..end` over the session
    /// (`EngineRead`, served from the client's memory), into their place in `buf`; marks
    /// their pages [`FETCHED`] and empties the runs.
    fn fetch_runs(&mut self, offset: u64, end: u64, buf: &mut [u8]) -> Result<(), Error> {
        let shift = self.page_shift;
        let first_page = offset >> shift;
        for i in 0..self.runs.len() {
            let (start, pages) = self.runs[i];
            let from = offset.max(start << shift);
            let to = end.min((start + pages) << shift);
            let mut at = from;
            while at < to {
                let n = (to - at).min(memshadow_proto::MAX_READ as u64);
                let req = Request::EngineRead {
                    offset: at,
                    len: n as u32,
                };
                // Served like a fault (it may fault).
                let bytes = match self.call_acknowledging(&req)? {
                    Response::Data { bytes } if bytes.len() as u64 == n => bytes,
                    Response::Data { bytes } => {
                        return Err(Error::Protocol(format!(
                            "{} bytes for a read of {n}",
                            bytes.len()
                        )))
                    }
                    r => return Err(unexpected(r)),
                };
                let i = (at - offset) as usize;
                buf[i..i + bytes.len()].copy_from_slice(&bytes);
                self.stats.fetches += 1;
                at += n;
            }
            for page in start..start + pages {
                self.slots[(page - first_page) as usize] = FETCHED;
            }
        }
        self.runs.clear();
        Ok(())
    }

    /// The ring: drop what it names, acknowledge, wake the daemon.
    fn process_flushes(&mut self) -> Result<(), Error> {
        RingState {
            tlb: &mut self.tlb,
            acked: &mut self.acked,
            flush_all_seen: &mut self.flush_all_seen,
            stats: &mut self.stats,
        }
        .process(&self.maps)
    }

    /// Sends `req` (a fault or a fetch) and acknowledges flushes until it is answered: it may
    /// wait for an invalidation of the mirror to end, whose finish waits for this engine. No
    /// copy is under way meanwhile, and the read translates again afterwards.
    fn call_acknowledging(&mut self, req: &Request) -> Result<Response, Error> {
        let Engine {
            session,
            doorbell,
            doorbell_nonblocking,
            maps,
            tlb,
            acked,
            flush_all_seen,
            stats,
            ..
        } = self;
        session.call_serving(req, doorbell.as_fd(), || {
            drain(doorbell.as_fd(), *doorbell_nonblocking);
            RingState {
                tlb: &mut *tlb,
                acked: &mut *acked,
                flush_all_seen: &mut *flush_all_seen,
                stats: &mut *stats,
            }
            .process(maps)
        })
    }

    /// Empties the doorbell, without blocking.
    fn drain_doorbell(&self) {
        drain(self.doorbell.as_fd(), self.doorbell_nonblocking);
    }

    #[cfg(test)]
    fn set_stuck_after(&mut self, d: Duration) {
        self.stuck_after = d;
    }

    #[cfg(test)]
    fn tlb_len(&self) -> usize {
        self.tlb.valid
    }
}

/// Empties a doorbell (the read end of a pipe the daemon writes a byte into per ring),
/// without blocking (a doorbell whose file is not `O_NONBLOCK` is polled before each read);
/// a failure is ignored (the ring, not the doorbell, says what to do).
pub(crate) fn drain(doorbell: BorrowedFd<'_>, nonblocking: bool) {
    let mut buf = [0u8; 256];
    loop {
        if !nonblocking {
            let mut fds = [nix::poll::PollFd::new(
                doorbell,
                nix::poll::PollFlags::POLLIN,
            )];
            if !matches!(
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
                Ok(1)
            ) {
                return;
            }
        }
        // A full buffer may mean more; anything else (short, EAGAIN, end) is all.
        match nix::unistd::read(doorbell, &mut buf) {
            Ok(n) if n == buf.len() => continue,
            _ => return,
        }
    }
}

/// What handling the flush ring changes of an engine, borrowed apart from its session so
/// that flushes can be acknowledged while a request on the session waits for its answer.
struct RingState<'a> {
    tlb: &'a mut Tlb,
    acked: &'a mut u64,
    flush_all_seen: &'a mut u64,
    stats: &'a mut EngineStats,
}

impl RingState<'_> {
    /// The ring: drop what it names, acknowledge, wake the daemon.
    fn process(&mut self, maps: &Maps) -> Result<(), Error> {
        let ring = maps.ring_header();
        if ring.evicted.load(Ordering::Acquire) != 0 {
            return Err(evicted());
        }
        let head = ring.head.load(Ordering::Acquire);
        let flush_all = ring.flush_all.load(Ordering::Acquire);
        if flush_all > *self.flush_all_seen {
            self.tlb.clear();
            *self.flush_all_seen = flush_all;
        }
        if head <= *self.acked {
            // Nothing new (a head below the ack would be a daemon's lie: nothing to do).
            return Ok(());
        }
        let new = head - *self.acked;
        if new > u64::from(RING_ENTRIES) {
            // More than the ring holds: some were overwritten (or the head lies).
            self.tlb.clear();
        } else {
            let entries = maps.ring_entries();
            for seq in *self.acked + 1..=head {
                match entries[(seq % u64::from(RING_ENTRIES)) as usize].read(seq) {
                    Some((first, last)) => self.tlb.drop_range(first, last),
                    // A "flush all" sequence number, or an overwritten entry: drop all.
                    None => self.tlb.clear(),
                }
            }
        }
        self.stats.flushes_processed = self.stats.flushes_processed.saturating_add(new);
        *self.acked = head;
        ring.tlb.store(self.tlb.valid as u64, Ordering::Relaxed);
        ring.ack.store(head, Ordering::Release);
        futex_wake(&ring.ack);
        Ok(())
    }
}

impl AsFd for Engine {
    /// The doorbell ([`Engine::fd`]).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

fn builder(socket: Option<&Path>) -> Builder {
    match socket {
        Some(p) => Client::builder().socket(p),
        None => Client::builder(),
    }
}

fn evicted() -> Error {
    Error::Evicted(
        "the daemon evicted this engine (a flush was not acknowledged in time); what it \
         reads can no longer be trusted"
            .into(),
    )
}

/// One more look at an odd epoch: spin, now and then yield, and give up once it has been odd
/// for `stuck_after`.
pub(crate) fn wait_odd(
    spins: &mut u32,
    odd_since: &mut Option<Instant>,
    stuck_after: Duration,
) -> Result<(), Error> {
    let since = *odd_since.get_or_insert_with(Instant::now);
    *spins += 1;
    if *spins < SPINS_BEFORE_YIELD {
        std::hint::spin_loop();
        return Ok(());
    }
    *spins = 0;
    if since.elapsed() > stuck_after {
        return Err(Error::Protocol(format!(
            "the client's epoch has been odd for more than {stuck_after:?}: memshadowd seems \
             stuck reading its events"
        )));
    }
    std::thread::yield_now();
    Ok(())
}

/// Wakes every waiter of the futex on `word`'s low half (the daemon, waiting for an ack).
fn futex_wake(word: &AtomicU64) -> i64 {
    let uaddr = word.as_ptr().cast::<u32>();
    // SAFETY: FUTEX_WAKE neither reads nor writes `*uaddr`: it only uses the address (a live,
    // 4-byte aligned word of the ring mapping, `ack`'s low half on this little-endian
    // machine as engine_abi asserts) as the key of the waiters to wake; the timeout, second
    // address and value arguments are unused. Shared, not FUTEX_PRIVATE_FLAG: the waiter is
    // another process, mapping the same file page, and a shared key is that page.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            uaddr,
            libc::FUTEX_WAKE,
            i32::MAX,
            ptr::null::<libc::timespec>(),
            ptr::null::<u32>(),
            0u32,
        )
    }
}

/// The mirror's geometry an `EngineAttached` answer gives, checked.
#[derive(Debug)]
struct Geometry {
    addr: u64,
    pages: u64,
    page_size: u64,
    shadow_bytes: usize,
    pt_bytes: usize,
}

impl Geometry {
    fn check(
        addr: u64,
        len: u64,
        shadow_bytes: u64,
        page_size: u32,
        session_page_size: u32,
    ) -> Result<Geometry, Error> {
        let bad = |what: String| Err(Error::Protocol(format!("EngineAttached: {what}")));
        if !page_size.is_power_of_two() || page_size != session_page_size {
            return bad(format!(
                "page size {page_size}, the session's is {session_page_size}"
            ));
        }
        let ps = u64::from(page_size);
        if len == 0
            || len % ps != 0
            || addr % ps != 0
            || addr.checked_add(len).is_none()
            || shadow_bytes == 0
            || shadow_bytes % ps != 0
        {
            return bad(format!(
                "mirror {addr:#x}+{len:#x} and shadow of {shadow_bytes:#x} bytes are not \
                 whole pages of {ps}"
            ));
        }
        let pages = len / ps;
        let (Ok(shadow_bytes), Ok(pt_bytes)) = (
            usize::try_from(shadow_bytes),
            usize::try_from(abi::pt_bytes(pages)),
        ) else {
            return bad("mappings larger than the address space".into());
        };
        Ok(Geometry {
            addr,
            pages,
            page_size: ps,
            shadow_bytes,
            pt_bytes,
        })
    }
}

/// The four mappings of an engine. The read-only ones are mapped read-only (the daemon
/// opened their fds read-only); the ring read-write, shared.
#[derive(Debug)]
struct Maps {
    epoch: MmapRaw,
    pt: MmapRaw,
    shadow: MmapRaw,
    ring: MmapRaw,
    /// Words of the page table.
    pages: u64,
    page_size: u64,
    /// Slots of the shadow mapping.
    slots: u64,
}

impl Maps {
    fn map(
        g: &Geometry,
        epoch: &OwnedFd,
        pt: &OwnedFd,
        shadow: &OwnedFd,
        ring: &OwnedFd,
    ) -> Result<Maps, Error> {
        Ok(Maps {
            epoch: map(epoch, "epoch page", EPOCH_BYTES, false)?,
            pt: map(pt, "page table", g.pt_bytes, false)?,
            shadow: map(shadow, "shadow", g.shadow_bytes, false)?,
            ring: map(ring, "ring", abi::ring_bytes(), true)?,
            pages: g.pages,
            page_size: g.page_size,
            slots: g.shadow_bytes as u64 / g.page_size,
        })
    }

    /// The magics and versions of the three headers, and the page table against `g`.
    fn check_headers(&self, g: &Geometry) -> Result<(), Error> {
        let bad = |what: &str, magic: u32, version: u32| {
            Err(Error::Protocol(format!(
                "the {what} has magic {magic:#x} version {version}, not the engine ABI's \
                 version {ENGINE_ABI_VERSION}"
            )))
        };
        let e = self.epoch_page();
        if e.magic != EPOCH_MAGIC || e.version != ENGINE_ABI_VERSION {
            return bad("epoch page", e.magic, e.version);
        }
        let p = self.pt_header();
        if p.magic != PT_MAGIC || p.version != ENGINE_ABI_VERSION {
            return bad("page table", p.magic, p.version);
        }
        let r = self.ring_header();
        if r.magic != RING_MAGIC || r.version != ENGINE_ABI_VERSION {
            return bad("ring", r.magic, r.version);
        }
        if p.pages != g.pages || p.addr != g.addr || p.page_size != g.page_size {
            return Err(Error::Protocol(format!(
                "the page table is of {} pages of {} at {:#x}; the answer said {} pages of {} \
                 at {:#x}",
                p.pages, p.page_size, p.addr, g.pages, g.page_size, g.addr
            )));
        }
        if r.entries != RING_ENTRIES {
            return Err(Error::Protocol(format!(
                "the ring has {} entries, not {RING_ENTRIES}",
                r.entries
            )));
        }
        Ok(())
    }

    fn epoch_page(&self) -> &EpochPage {
        // SAFETY: `epoch` maps EPOCH_BYTES (>= 64) bytes of a file at least that long, page
        // aligned, so an `EpochPage` (64 bytes, align 64) is at its start; every bit pattern
        // is a valid `EpochPage`; the mapping lives as long as `self`. After it sent the fd
        // the daemon changes only `epoch`, atomically; an atomic load of a read-only mapping
        // is allowed (a `u64` load is lock-free on the targets memshadow runs on).
        unsafe { &*self.epoch.as_ptr().cast::<EpochPage>() }
    }

    fn pt_header(&self) -> &PtHeader {
        // SAFETY: as for `epoch_page`: `pt` maps at least HEADER_BYTES (>= 64) bytes, page
        // aligned; a `PtHeader` is plain integers, written by the daemon before it sent the
        // fd and never again.
        unsafe { &*self.pt.as_ptr().cast::<PtHeader>() }
    }

    /// The page-table words, one per page of the mirror.
    fn pt_words(&self) -> &[AtomicU64] {
        let first = self
            .pt
            .as_ptr()
            .wrapping_add(abi::HEADER_BYTES)
            .cast::<AtomicU64>();
        // SAFETY: `pt` maps `pt_bytes(pages)` = HEADER_BYTES + 8 * pages bytes of a file at
        // least that long, page aligned, so `pages` aligned words follow the header, valid
        // for any bits, for as long as `self` lives; the daemon writes them only atomically.
        unsafe { std::slice::from_raw_parts(first, self.pages as usize) }
    }

    fn ring_header(&self) -> &RingHeader {
        // SAFETY: `ring` maps `ring_bytes()` >= HEADER_BYTES bytes of a file at least that
        // long, page aligned, so a `RingHeader` (128 bytes, align 64) is at its start; every
        // bit pattern is valid; the daemon changes only its atomics after it sent the fd.
        unsafe { &*self.ring.as_ptr().cast::<RingHeader>() }
    }

    fn ring_entries(&self) -> &[RingEntry] {
        let first = self
            .ring
            .as_ptr()
            .wrapping_add(abi::HEADER_BYTES)
            .cast::<RingEntry>();
        // SAFETY: `ring` maps `ring_bytes()` = HEADER_BYTES + RING_ENTRIES entries, page
        // aligned (entries are 32 bytes, align 8), for as long as `self` lives; an entry is
        // atomics only, valid for any bits.
        unsafe { std::slice::from_raw_parts(first, RING_ENTRIES as usize) }
    }
}

/// Maps `bytes` of `fd`, shared, read-only or read-write, after checking the file is that
/// long (a mapping past its end would fault with SIGBUS).
pub(crate) fn map(
    fd: &OwnedFd,
    what: &str,
    bytes: usize,
    writable: bool,
) -> Result<MmapRaw, Error> {
    let err = |e: String| Error::Protocol(format!("cannot map the {what} fd: {e}"));
    let st = nix::sys::stat::fstat(fd).map_err(|e| err(e.to_string()))?;
    if u64::try_from(st.st_size).unwrap_or(0) < bytes as u64 {
        return Err(err(format!("it has {} bytes, {bytes} needed", st.st_size)));
    }
    let mut o = MmapOptions::new();
    o.len(bytes);
    if writable {
        o.map_raw(fd)
    } else {
        o.map_raw_read_only(fd)
    }
    .map_err(|e| err(e.to_string()))
}

/// Checks the doorbell is a pipe's read end (when `/proc` says); returns whether it is
/// non-blocking.
pub(crate) fn check_doorbell(fd: &OwnedFd) -> Result<bool, Error> {
    if let Ok(t) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        if !t.to_str().is_some_and(|t| t.starts_with("pipe:[")) {
            return Err(Error::Protocol(format!(
                "the doorbell is {}, not a pipe",
                t.display()
            )));
        }
    }
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| Error::Protocol(format!("the doorbell: {e}")))?;
    if flags & libc::O_ACCMODE != libc::O_RDONLY {
        return Err(Error::Protocol(
            "the doorbell is not the read end of a pipe".into(),
        ));
    }
    Ok(nix::fcntl::OFlag::from_bits_truncate(flags).contains(nix::fcntl::OFlag::O_NONBLOCK))
}

/// An entry of the TLB; `vpn` [`Tlb::EMPTY`] when free.
#[derive(Debug, Clone, Copy)]
struct TlbEntry {
    vpn: u64,
    slot: u32,
}

/// The engine's private TLB: [`TLB_ENTRIES`] entries, direct-mapped by the low bits of the
/// virtual page number and tagged with the whole number. Small and fixed (no allocation, no
/// hashing on the read path); a conflict replaces the older translation.
struct Tlb {
    entries: Box<[TlbEntry]>,
    /// Entries in use.
    valid: usize,
}

impl std::fmt::Debug for Tlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tlb").field("valid", &self.valid).finish()
    }
}

impl Tlb {
    /// No virtual page has this number (addresses are below 2^64).
    const EMPTY: u64 = u64::MAX;

    fn new() -> Tlb {
        Tlb {
            entries: vec![
                TlbEntry {
                    vpn: Tlb::EMPTY,
                    slot: 0
                };
                TLB_ENTRIES
            ]
            .into_boxed_slice(),
            valid: 0,
        }
    }

    fn index(vpn: u64) -> usize {
        vpn as usize & (TLB_ENTRIES - 1)
    }

    fn get(&self, vpn: u64) -> Option<u32> {
        let e = self.entries[Tlb::index(vpn)];
        (e.vpn == vpn).then_some(e.slot)
    }

    fn insert(&mut self, vpn: u64, slot: u32) {
        let e = &mut self.entries[Tlb::index(vpn)];
        if e.vpn == Tlb::EMPTY {
            self.valid += 1;
        }
        *e = TlbEntry { vpn, slot };
    }

    fn clear(&mut self) {
        if self.valid != 0 {
            self.entries.iter_mut().for_each(|e| e.vpn = Tlb::EMPTY);
            self.valid = 0;
        }
    }

    /// Drops the translations of `first..=last` (an inverted range drops everything).
    fn drop_range(&mut self, first: u64, last: u64) {
        if last < first {
            return self.clear();
        }
        if self.valid == 0 {
            return;
        }
        if last - first >= TLB_ENTRIES as u64 {
            for e in self.entries.iter_mut() {
                if e.vpn != Tlb::EMPTY && (first..=last).contains(&e.vpn) {
                    e.vpn = Tlb::EMPTY;
                    self.valid -= 1;
                }
            }
        } else {
            for vpn in first..=last {
                let e = &mut self.entries[Tlb::index(vpn)];
                if e.vpn == vpn {
                    e.vpn = Tlb::EMPTY;
                    self.valid -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
