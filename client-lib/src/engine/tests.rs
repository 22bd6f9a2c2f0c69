//! Unit tests of the engine against a fake daemon: the test lays out the shared memory with
//! the `engine_abi` types in memfds (playing the daemon's part: page-table words, shadow
//! slots, ring requests, the epoch) and hands the engine read-only reopened copies.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::fake_daemon;
use memshadow_proto::{ErrorCode, Limits};
use nix::fcntl::OFlag;
use nix::sys::memfd::{memfd_create, MFdFlags};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const PS: u64 = 4096;
const ADDR: u64 = 0x7f12_3400_0000;
const PAGES: u64 = 16;
const SLOTS: u64 = 64;
const ENGINE_ID: u32 = 7;
const MIRROR_ID: u64 = 3;

/// The byte a populated page `page` holds.
fn pattern(page: u64) -> u8 {
    page as u8 + 1
}

/// The client's virtual page number of page `page` of the mirror.
fn vpn(page: u64) -> u64 {
    ADDR / PS + page
}

fn memfd(name: &str, bytes: usize) -> OwnedFd {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, bytes as i64).unwrap();
    fd
}

/// A read-only open of what `fd` is, as the daemon hands it out.
fn reopen_read_only(fd: &OwnedFd) -> OwnedFd {
    File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .into()
}

/// The daemon's side of an engine: read-write mappings of the five files.
struct Shared {
    maps: Maps,
    epoch_fd: OwnedFd,
    pt_fd: OwnedFd,
    shadow_fd: OwnedFd,
    ring_fd: OwnedFd,
    /// The doorbell's read end (handed out) and write end (rung here), as the daemon's.
    doorbell: OwnedFd,
    bell_write: OwnedFd,
    gen: AtomicU32,
    /// `EngineFault`s received, (offset, len).
    faults: Mutex<Vec<(u64, u64)>>,
    /// Whether an `EngineFault` populates the pages (else it only answers `Populated`).
    populate: AtomicBool,
}

impl Shared {
    fn new(nonblocking_doorbell: bool) -> Arc<Shared> {
        let g = Geometry::check(ADDR, PAGES * PS, SLOTS * PS, PS as u32, PS as u32).unwrap();
        let epoch_fd = memfd("epoch", EPOCH_BYTES);
        let pt_fd = memfd("pt", g.pt_bytes);
        let shadow_fd = memfd("shadow", g.shadow_bytes);
        let ring_fd = memfd("ring", abi::ring_bytes());
        let rw = |fd: &OwnedFd, n: usize| MmapOptions::new().len(n).map_raw(fd).unwrap();
        let maps = Maps {
            epoch: rw(&epoch_fd, EPOCH_BYTES),
            pt: rw(&pt_fd, g.pt_bytes),
            shadow: rw(&shadow_fd, g.shadow_bytes),
            ring: rw(&ring_fd, abi::ring_bytes()),
            pages: PAGES,
            page_size: PS,
            slots: SLOTS,
        };
        // SAFETY: the mapping is page aligned and a page long, nobody else uses it yet.
        unsafe {
            ptr::write(
                maps.epoch.as_mut_ptr().cast::<EpochPage>(),
                EpochPage {
                    magic: EPOCH_MAGIC,
                    version: ENGINE_ABI_VERSION,
                    epoch: AtomicU64::new(0),
                },
            )
        };
        // SAFETY: as above, for the page table's header.
        unsafe {
            ptr::write(
                maps.pt.as_mut_ptr().cast::<PtHeader>(),
                PtHeader {
                    magic: PT_MAGIC,
                    version: ENGINE_ABI_VERSION,
                    addr: ADDR,
                    pages: PAGES,
                    page_size: PS,
                },
            )
        };
        // SAFETY: as above: the ring header's first four u32 fields (magic, version,
        // entries, engine_id; offsets asserted by engine_abi); the rest stays zero.
        unsafe {
            ptr::write(
                maps.ring.as_mut_ptr().cast::<[u32; 4]>(),
                [RING_MAGIC, ENGINE_ABI_VERSION, RING_ENTRIES, ENGINE_ID],
            )
        };
        let mut flags = OFlag::O_CLOEXEC;
        if nonblocking_doorbell {
            flags |= OFlag::O_NONBLOCK;
        }
        let (doorbell, bell_write) = nix::unistd::pipe2(flags).unwrap();
        Arc::new(Shared {
            maps,
            epoch_fd,
            pt_fd,
            shadow_fd,
            ring_fd,
            doorbell,
            bell_write,
            gen: AtomicU32::new(1),
            faults: Mutex::new(Vec::new()),
            populate: AtomicBool::new(true),
        })
    }

    /// The five fds of an `EngineAttached`, as the daemon sends them.
    fn engine_fds(&self) -> Vec<OwnedFd> {
        vec![
            reopen_read_only(&self.epoch_fd),
            reopen_read_only(&self.pt_fd),
            reopen_read_only(&self.shadow_fd),
            self.ring_fd.try_clone().unwrap(),
            self.doorbell.try_clone().unwrap(),
        ]
    }

    fn answer(&self) -> Response {
        Response::EngineAttached {
            engine_id: ENGINE_ID,
            mirror_id: MIRROR_ID,
            addr: ADDR,
            len: PAGES * PS,
            shadow_bytes: SLOTS * PS,
            page_size: PS as u32,
        }
    }

    fn fill(&self, slot: u32, byte: u8) {
        let at = self
            .maps
            .shadow
            .as_mut_ptr()
            .wrapping_add(slot as usize * PS as usize);
        // SAFETY: slot < SLOTS: a page inside the shadow mapping; the engine only reads it.
        unsafe { ptr::write_bytes(at, byte, PS as usize) };
    }

    /// Puts page `page` of the mirror in `slot`, holding `byte`s.
    fn map_page(&self, page: u64, slot: u32, byte: u8) {
        self.fill(slot, byte);
        let gen = self.gen.fetch_add(1, Ordering::Relaxed);
        self.maps.pt_words()[page as usize].store(abi::pte_word(slot, gen), Ordering::Release);
    }

    /// Queues a flush of virtual pages `first..=last` and rings; returns its sequence number.
    fn post(&self, first: u64, last: u64) -> u64 {
        let ring = self.maps.ring_header();
        let seq = ring.head.load(Ordering::Relaxed) + 1;
        self.maps.ring_entries()[(seq % u64::from(RING_ENTRIES)) as usize].write(seq, first, last);
        ring.head.store(seq, Ordering::Release);
        self.ring();
        seq
    }

    /// Queues a "flush all" and rings; returns its sequence number.
    fn post_flush_all(&self) -> u64 {
        let ring = self.maps.ring_header();
        let seq = ring.head.load(Ordering::Relaxed) + 1;
        ring.flush_all.store(seq, Ordering::Release);
        ring.head.store(seq, Ordering::Release);
        self.ring();
        seq
    }

    fn ring(&self) {
        nix::unistd::write(&self.bell_write, &[1]).unwrap();
    }

    fn doorbell_rung(&self) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            self.doorbell.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap() == 1
    }

    fn ack(&self) -> u64 {
        self.maps.ring_header().ack.load(Ordering::Acquire)
    }

    fn epoch(&self) -> &AtomicU64 {
        &self.maps.epoch_page().epoch
    }

    /// Serves an `EngineFault` as the daemon does: each page of the range goes into slot
    /// `32 + page`, holding `pattern(page)`.
    fn serve_fault(&self, offset: u64, len: u64) -> Response {
        self.faults.lock().unwrap().push((offset, len));
        if self.populate.load(Ordering::Relaxed) {
            for page in offset / PS..(offset + len) / PS {
                self.map_page(page, 32 + page as u32, pattern(page));
            }
        }
        Response::Populated { pages: len / PS }
    }
}

/// A fake daemon answering `EngineAttach` with `shared`'s fds and serving `EngineFault`s.
fn engine_daemon(shared: &Arc<Shared>) -> (OwnedFd, JoinHandle<()>) {
    let shared = Arc::clone(shared);
    fake_daemon::spawn_with_fds(Limits::default(), move |req, _| match *req {
        Request::EngineAttach { token: 42, .. } => Some((shared.answer(), shared.engine_fds())),
        Request::EngineFault { offset, len } => Some((shared.serve_fault(offset, len), vec![])),
        // Served from "the client's memory": every byte of page p is 100 + p.
        Request::EngineRead { offset, len } => {
            let bytes = (offset..offset + u64::from(len))
                .map(|a| 100 + (a / PS) as u8)
                .collect();
            Some((Response::Data { bytes }, vec![]))
        }
        _ => None,
    })
}

fn attach(shared: &Arc<Shared>) -> (Engine, JoinHandle<()>) {
    let (sock, daemon) = engine_daemon(shared);
    let e = Engine::attach_with(Client::builder().socket_fd(sock), 42, 0, 0).unwrap();
    (e, daemon)
}

fn read(e: &mut Engine, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    e.read(offset, &mut buf).unwrap();
    buf
}

#[test]
fn an_engine_attaches_with_what_the_answer_says() {
    let shared = Shared::new(true);
    let (e, daemon) = attach(&shared);
    assert_eq!(
        (
            e.engine_id(),
            e.mirror_id(),
            e.addr(),
            e.len(),
            e.page_size()
        ),
        (ENGINE_ID, MIRROR_ID, ADDR, PAGES * PS, PS)
    );
    assert!(!e.is_empty());
    assert_eq!(e.stats(), EngineStats::default());
    assert_eq!(e.fd().as_raw_fd(), e.as_fd().as_raw_fd());
    e.detach();
    daemon.join().unwrap();
}

/// Missing pages are faulted in, one `EngineFault` per missing run; the read then copies
/// from the slots, and a second read finds every translation in the TLB.
#[test]
fn reads_fault_missing_runs_then_hit_the_tlb() {
    let shared = Shared::new(true);
    for page in [0, 1, 5] {
        shared.map_page(page, 5 + page as u32, pattern(page));
    }
    let (mut e, daemon) = attach(&shared);
    let (offset, len) = (100, 6 * PS as usize + 50);
    let buf = read(&mut e, offset, len);
    for (i, &b) in buf.iter().enumerate() {
        assert_eq!(b, pattern((offset + i as u64) / PS), "byte {i}");
    }
    assert_eq!(
        *shared.faults.lock().unwrap(),
        [(2 * PS, 3 * PS), (6 * PS, PS)],
        "pages 2..=4 and 6, page aligned"
    );
    let s = e.stats();
    assert_eq!((s.faults, s.retries, s.tlb_hits), (2, 1, 3));
    assert_eq!(e.tlb_len(), 7);
    assert_eq!(read(&mut e, offset, len), buf);
    let s2 = e.stats();
    assert_eq!(s2.tlb_hits - s.tlb_hits, 7);
    assert_eq!((s2.tlb_misses, s2.faults), (s.tlb_misses, 2));
    drop(e);
    daemon.join().unwrap();
}

/// A translation is used until a flush names it; a flush of other pages leaves it.
#[test]
fn flushes_drop_the_translations_they_name_and_are_acknowledged() {
    let shared = Shared::new(true);
    shared.map_page(0, 5, 0xaa);
    shared.map_page(1, 6, 0x11);
    let (mut e, daemon) = attach(&shared);
    assert_eq!(
        read(&mut e, 0, 2 * PS as usize)[PS as usize - 1..=PS as usize],
        [0xaa, 0x11]
    );
    // The daemon moves page 0 without a flush: the engine's TLB still says slot 5.
    shared.map_page(0, 9, 0xbb);
    assert_eq!(read(&mut e, 0, 1), [0xaa]);
    // A flush of pages 5..=7 leaves both translations.
    let s1 = shared.post(vpn(5), vpn(7));
    e.poll().unwrap();
    assert_eq!((shared.ack(), e.tlb_len()), (s1, 2));
    assert!(!shared.doorbell_rung(), "poll drains the doorbell");
    // A flush of page 0: the next read sees the new slot. `read` acknowledges by itself.
    let s2 = shared.post(vpn(0), vpn(0));
    assert_eq!(read(&mut e, 0, 1), [0xbb]);
    assert_eq!(shared.ack(), s2);
    assert_eq!(read(&mut e, PS, 1), [0x11], "page 1 kept its translation");
    assert_eq!(e.stats().flushes_processed, 2);
    drop(e);
    daemon.join().unwrap();
}

/// A "flush all", an entry that does not hold its sequence number, and a head more than a
/// ring ahead each drop every translation.
#[test]
fn a_flush_all_or_an_entry_not_found_clears_the_whole_tlb() {
    let shared = Shared::new(true);
    for page in 0..8 {
        shared.map_page(page, page as u32, pattern(page));
    }
    let (mut e, daemon) = attach(&shared);
    let fill = |e: &mut Engine| {
        read(e, 0, 8 * PS as usize);
        assert_eq!(e.tlb_len(), 8);
    };
    fill(&mut e);
    let s = shared.post_flush_all();
    e.poll().unwrap();
    assert_eq!((e.tlb_len(), shared.ack()), (0, s));

    fill(&mut e);
    // Sequence s+1 queued without its entry (as if overwritten).
    let ring = shared.maps.ring_header();
    ring.head.store(s + 1, Ordering::Release);
    e.poll().unwrap();
    assert_eq!((e.tlb_len(), shared.ack()), (0, s + 1));

    fill(&mut e);
    let far = s + 1 + u64::from(RING_ENTRIES) + 1;
    ring.head.store(far, Ordering::Release);
    e.poll().unwrap();
    assert_eq!((e.tlb_len(), shared.ack()), (0, far));

    fill(&mut e);
    // An inverted range: be safe, drop everything.
    shared.post(vpn(3), vpn(1));
    e.poll().unwrap();
    assert_eq!(e.tlb_len(), 0);
    drop(e);
    daemon.join().unwrap();
}

/// The ack wakes a waiter of the futex on its low half: a shared futex (the daemon is
/// another process), here waiting through a mapping of its own at another address. The
/// doorbell here is blocking: polling must not block on it.
#[test]
fn acknowledging_wakes_a_waiter_of_the_shared_futex() {
    let shared = Shared::new(false);
    let (mut e, daemon) = attach(&shared);
    let other = MmapOptions::new()
        .len(abi::ring_bytes())
        .map_raw(&shared.ring_fd)
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        tx.send(nix::unistd::gettid().as_raw()).unwrap();
        let ack = other
            .as_ptr()
            .wrapping_add(std::mem::offset_of!(RingHeader, ack))
            .cast::<u32>();
        let timeout = libc::timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        // SAFETY: FUTEX_WAIT reads the aligned u32 at `ack` (in `other`, alive for the
        // call) and sleeps while it is 0; `timeout` outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex,
                ack,
                libc::FUTEX_WAIT,
                0u32,
                &timeout as *const libc::timespec,
                ptr::null::<u32>(),
                0u32,
            )
        };
        (r, std::io::Error::last_os_error().raw_os_error())
    });
    let tid = rx.recv().unwrap();
    // Wait until the waiter sleeps in the futex (its current system call says so).
    let deadline = Instant::now() + Duration::from_secs(5);
    let futex = libc::SYS_futex.to_string();
    loop {
        match std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")) {
            Ok(s) if s.split_whitespace().next() == Some(futex.as_str()) => break,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
            _ => {
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
        }
    }
    e.poll().unwrap();
    assert_eq!(shared.ack(), 0, "nothing to acknowledge: no store, no wake");
    shared.post(vpn(0), vpn(0));
    e.poll().unwrap();
    assert_eq!(shared.ack(), 1);
    assert!(!shared.doorbell_rung());
    let (r, errno) = waiter.join().unwrap();
    assert_eq!(r, 0, "woken (not timed out): errno {errno:?}");
    drop(e);
    daemon.join().unwrap();
}

#[test]
fn an_evicted_engine_refuses_poll_and_read() {
    let shared = Shared::new(true);
    shared.map_page(0, 0, 1);
    let (mut e, daemon) = attach(&shared);
    read(&mut e, 0, 1);
    shared
        .maps
        .ring_header()
        .evicted
        .store(1, Ordering::Release);
    assert!(matches!(e.poll(), Err(Error::Evicted(_))));
    assert!(matches!(e.read(0, &mut [0]), Err(Error::Evicted(_))));
    drop(e);
    daemon.join().unwrap();
}

#[test]
fn reads_outside_the_mirror_are_bad_ranges() {
    let shared = Shared::new(true);
    let (mut e, daemon) = attach(&shared);
    let len = PAGES * PS;
    for (offset, n) in [(len, 1), (len - 1, 2), (u64::MAX, 2)] {
        assert!(
            matches!(e.read(offset, &mut [0u8; 2][..n]), Err(Error::BadRange(_))),
            "{offset:#x}+{n}"
        );
    }
    e.read(len, &mut []).unwrap();
    assert!(shared.faults.lock().unwrap().is_empty());
    drop(e);
    daemon.join().unwrap();
}

/// An odd epoch holds a read back until it is even again; one that stays odd too long is the
/// daemon stuck.
#[test]
fn an_odd_epoch_waits_and_a_stuck_one_gives_up() {
    let shared = Shared::new(true);
    shared.map_page(0, 0, 9);
    let (mut e, daemon) = attach(&shared);
    shared.epoch().store(1, Ordering::Release);
    let evener = std::thread::spawn({
        let shared = Arc::clone(&shared);
        move || {
            std::thread::sleep(Duration::from_millis(50));
            shared.epoch().store(2, Ordering::Release);
        }
    });
    let t = Instant::now();
    assert_eq!(read(&mut e, 0, 1), [9]);
    assert!(t.elapsed() >= Duration::from_millis(40));
    evener.join().unwrap();

    shared.epoch().store(3, Ordering::Release);
    e.set_stuck_after(Duration::from_millis(100));
    match e.read(0, &mut [0]) {
        Err(Error::Protocol(m)) => assert!(m.contains("stuck"), "{m}"),
        r => panic!("{r:?}"),
    }
    drop(e);
    daemon.join().unwrap();
}

/// Pages a fault does not install (the daemon may not, while their client's discard is
/// not seen made) are read over the session after one fault, and not cached.
#[test]
fn pages_a_fault_does_not_install_are_read_over_the_session() {
    let shared = Shared::new(true);
    shared.populate.store(false, Ordering::Relaxed);
    let (mut e, daemon) = attach(&shared);
    let mut buf = vec![0u8; (2 * PS) as usize];
    e.read(PS + 8, &mut buf).unwrap();
    let want: Vec<u8> = (0..2 * PS)
        .map(|i| 100 + ((PS + 8 + i) / PS) as u8)
        .collect();
    assert_eq!(buf, want);
    assert_eq!(e.stats().faults, 1, "one fault, then the fetch");
    assert_eq!(e.stats().fetches, 1);
    assert_eq!(e.tlb_len(), 0, "nothing cached");
    drop(e);
    daemon.join().unwrap();
}

/// A slot beyond the shadow in a page-table word is refused, not read.
#[test]
fn a_slot_beyond_the_shadow_is_refused() {
    let shared = Shared::new(true);
    shared.maps.pt_words()[0].store(abi::pte_word(SLOTS as u32, 1), Ordering::Release);
    let (mut e, daemon) = attach(&shared);
    assert!(matches!(e.read(0, &mut [0]), Err(Error::Protocol(_))));
    drop(e);
    daemon.join().unwrap();
}

/// What `attach` refuses: the wrong number of fds, a bad header, a page table or shadow
/// that do not fit the answer, a doorbell that is no pipe; and the daemon's refusals.
#[test]
fn attach_checks_the_fds_and_the_headers() {
    #[derive(Debug, Clone, Copy)]
    enum Tweak {
        FourFds,
        PtMagic,
        MorePages,
        ShadowTooLong,
        DoorbellNotPipe,
        OtherMirror,
        NoSuchGrant,
    }
    for tweak in [
        Tweak::FourFds,
        Tweak::PtMagic,
        Tweak::MorePages,
        Tweak::ShadowTooLong,
        Tweak::DoorbellNotPipe,
        Tweak::OtherMirror,
        Tweak::NoSuchGrant,
    ] {
        let shared = Shared::new(true);
        if let Tweak::PtMagic = tweak {
            // SAFETY: the header's first u32 (magic) in the page-aligned mapping.
            unsafe { ptr::write(shared.maps.pt.as_mut_ptr().cast::<u32>(), 0xbad) };
        }
        let (sock, daemon) = fake_daemon::spawn_with_fds(Limits::default(), {
            let shared = Arc::clone(&shared);
            move |req, _| {
                let Request::EngineAttach { .. } = req else {
                    return None;
                };
                let mut answer = shared.answer();
                let mut fds = shared.engine_fds();
                let Response::EngineAttached {
                    len,
                    shadow_bytes,
                    mirror_id,
                    ..
                } = &mut answer
                else {
                    unreachable!()
                };
                match tweak {
                    Tweak::FourFds => drop(fds.pop()),
                    Tweak::MorePages => *len += PS,
                    Tweak::ShadowTooLong => *shadow_bytes += PS,
                    Tweak::DoorbellNotPipe => fds[4] = memfd("not-a-pipe", 8),
                    Tweak::OtherMirror => *mirror_id += 1,
                    Tweak::NoSuchGrant => {
                        return Some((
                            Response::error(ErrorCode::NoSuchGrant, "no such grant"),
                            vec![],
                        ))
                    }
                    Tweak::PtMagic => {}
                }
                Some((answer, fds))
            }
        });
        let b = Client::builder().socket_fd(sock);
        let r = match tweak {
            Tweak::OtherMirror => Engine::attach_with(b, 0, 1234, MIRROR_ID),
            _ => Engine::attach_with(b, 42, 0, 0),
        };
        match (tweak, r) {
            (Tweak::NoSuchGrant, Err(Error::NoSuchGrant(_))) => {}
            (Tweak::NoSuchGrant, r) => panic!("{tweak:?}: {r:?}"),
            (_, Err(Error::Protocol(_))) => {}
            (_, r) => panic!("{tweak:?}: {r:?}"),
        }
        daemon.join().unwrap();
    }
}

/// Arguments refused before anything is sent (no daemon needed).
#[test]
fn a_zero_token_or_a_bad_pid_is_refused_before_connecting() {
    let nowhere = Path::new("/nonexistent/memshadow.sock");
    assert!(matches!(
        Engine::attach(Some(nowhere), 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Engine::attach_pid(Some(nowhere), 0, 1),
        Err(Error::NoSuchClient(_))
    ));
    assert!(matches!(
        Engine::attach(Some(nowhere), 1),
        Err(Error::Connect { .. })
    ));
}

#[test]
fn the_tlb_is_direct_mapped_and_drops_ranges() {
    let mut t = Tlb::new();
    t.insert(1, 10);
    t.insert(2, 20);
    assert_eq!((t.get(1), t.get(2), t.valid), (Some(10), Some(20), 2));
    // A conflict replaces.
    t.insert(1 + TLB_ENTRIES as u64, 11);
    assert_eq!(
        (t.get(1), t.get(1 + TLB_ENTRIES as u64), t.valid),
        (None, Some(11), 2)
    );
    // A small range drops by index; a large one by scanning.
    t.drop_range(2, 2);
    assert_eq!((t.get(2), t.valid), (None, 1));
    t.insert(5000, 1);
    t.insert(7, 2);
    t.drop_range(1000, 100_000);
    assert_eq!(
        (t.get(5000), t.get(7), t.get(1 + TLB_ENTRIES as u64)),
        (None, Some(2), Some(11))
    );
    assert_eq!(t.valid, 2);
    t.drop_range(9, 8);
    assert_eq!(t.valid, 0);
    assert_eq!(t.get(7), None);
}
