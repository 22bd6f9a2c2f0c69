//! Tests of the address space with a real uffd on this process's own memory.
#![allow(clippy::unwrap_used)]

use std::mem::ManuallyDrop;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{AddressSpace, Deferred};
use crate::device::{Device, DeviceConfig};
use crate::dirty::uffd_wp::ArmingSource;
use crate::dirty::{Backend, ClientDirty};
use crate::notifier::{Event, InvalidateArgs, Range};
use crate::source::{MemorySource, ProcessVmSource};
use crate::sys::uffd::{features, SharedUffd, Uffd, UffdEvent};
use crate::sys::PAGE_SIZE;

type Mapping = ManuallyDrop<memmap2::MmapMut>;

/// A client without dirty tracking on this process's own memory, on a device made
/// with `cfg` (returned too, to keep alive beside it).
fn plain_space(cfg: &DeviceConfig) -> (Arc<AddressSpace>, Device) {
    let (uffd, _) = Uffd::create().unwrap();
    uffd.api(features::EVENT_UNMAP | features::EVENT_REMOVE | features::EVENT_REMAP)
        .unwrap();
    uffd.set_nonblocking().unwrap();
    let dev = Device::new(cfg).unwrap();
    let source = Arc::new(ProcessVmSource::new(std::process::id() as i32));
    let w = Arc::new(AddressSpace::new(
        uffd,
        dev.client(source, 1 << 20),
        None,
        8,
    ));
    (w, dev)
}

/// Maps fresh anonymous memory over `addr..addr+len` in one call, on another thread (an
/// unmap event of a registered range blocks it until read), serving events meanwhile.
fn map_over(w: &AddressSpace, addr: u64, len: usize, out: &mut Deferred) {
    let mapper = std::thread::spawn(move || {
        // SAFETY: the tests call this on mappings of their own, which they no longer
        // touch through other handles.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        p as u64
    });
    let mut buf = userfaultfd::EventBuffer::new(8);
    let mut scratch = Vec::new();
    while !mapper.is_finished() {
        w.read_events(&mut buf, &mut scratch, out).unwrap();
        std::thread::yield_now();
    }
    // One more read: the event that released the mapper may not be applied yet.
    w.read_events(&mut buf, &mut scratch, out).unwrap();
    assert_eq!(mapper.join().unwrap(), addr, "mapped over the range");
}

/// A client with uffd-wp dirty tracking on this process's own memory (and the device,
/// to keep alive beside it).
fn uffd_wp_space() -> (AddressSpace, Device) {
    let (uffd, user_mode_only) = Uffd::create().unwrap();
    assert!(!user_mode_only, "the tests run as root (docs/design.md §7)");
    uffd.api(
        Backend::UffdWp.uffd_features()
            | features::EVENT_UNMAP
            | features::EVENT_REMOVE
            | features::EVENT_REMAP,
    )
    .unwrap();
    uffd.set_nonblocking().unwrap();
    let uffd: SharedUffd = Arc::new(Mutex::new(Some(uffd)));
    let dirty = Arc::new(ClientDirty::new(Ok(Backend::UffdWp), None, Arc::default()));
    let source: Arc<dyn MemorySource> = Arc::new(ArmingSource::new(
        Arc::new(ProcessVmSource::new(std::process::id() as i32)),
        Arc::clone(&uffd),
        Arc::clone(&dirty),
    ));
    let dev = Device::new(&DeviceConfig::default()).unwrap();
    let w = AddressSpace::with_dirty(uffd, dev.client(source, 1 << 20), None, 8, dirty);
    (w, dev)
}

/// A client thread writing `byte` at `offset` of `map` (it may block in a write-protect
/// fault); the mapping comes back once the write is done.
fn write_in_thread(
    mut map: Mapping,
    offset: usize,
    byte: u8,
) -> crossbeam_channel::Receiver<Mapping> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        map[offset] = byte;
        let _ = tx.send(map);
    });
    rx
}

/// Waits for the writer of [`write_in_thread`]; fails after 20 s (a writer nobody
/// woke) instead of hanging.
fn written(writer: &crossbeam_channel::Receiver<Mapping>) -> Mapping {
    writer
        .recv_timeout(Duration::from_secs(20))
        .expect("the writer was never woken")
}

/// The event reader's part: reads until some events came (a test that expects events
/// fails after 20 s instead of spinning).
fn read_some_events(
    w: &AddressSpace,
    buf: &mut userfaultfd::EventBuffer,
    scratch: &mut Vec<UffdEvent>,
    out: &mut Deferred,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.read_events(buf, scratch, out).unwrap() == 0 {
        assert!(Instant::now() < deadline, "no userfaultfd event came");
        std::thread::yield_now();
    }
}

/// uffd-wp: when the un-protect of a write fault has to wait (`EAGAIN`), the fault's
/// invalidation ends first and the device may mirror the page again (arming it is a
/// no-op: it is still protected) before the writer is let go. The retry must invalidate
/// it again before waking the writer, or the copy from before the write survives it
/// with nothing armed to report the write. Fails if `retry_wakes` just un-protects and
/// wakes.
#[test]
fn a_deferred_wake_invalidates_a_page_mirrored_again_before_the_write() {
    crate::test_support::needs_full_userfaultfd!();
    let page = PAGE_SIZE as u64;
    let (w, _dev) = uffd_wp_space();
    // Unmapping a registered range blocks until its event is read: if an assertion
    // fails, the mapping leaks instead of hanging the unwinding.
    let mut map = ManuallyDrop::new(memmap2::MmapMut::map_anon(4 * PAGE_SIZE).unwrap());
    map.fill(1);
    let addr = map.as_ptr() as u64;
    let id = w.attach(addr, 4 * page).unwrap();
    assert_eq!(w.read(id, 0, 8).unwrap(), vec![1; 8], "mirrored and armed");

    // The fault's own un-protect and the retry at the end of that read of events.
    w.wakes.defer.store(2, Relaxed);
    let writer = write_in_thread(map, 0, 2);
    // The reader's part: read the write fault, invalidate the page, defer the wake.
    let mut buf = userfaultfd::EventBuffer::new(8);
    let mut scratch = Vec::new();
    let mut out = Deferred::default();
    read_some_events(&w, &mut buf, &mut scratch, &mut out);
    assert!(w.has_pending_wakes());
    drop(std::mem::take(&mut out.finishes));
    // The device mirrors the page again while the writer still waits.
    assert_eq!(w.read(id, 0, 8).unwrap(), vec![1; 8]);
    // The retry lets the writer go.
    assert!(!w.retry_wakes(&mut out), "nothing left pending");
    drop(std::mem::take(&mut out.finishes));
    let map = written(&writer);
    assert_eq!(map[0], 2);
    assert_eq!(
        w.read(id, 0, 8).unwrap(),
        [&[2u8][..], &[1; 7]].concat(),
        "the device read after the write returned the copy taken before it"
    );
    // And the page is armed again: the next write is seen.
    let before = w.dirty().counters().wp_faults.load(Relaxed);
    let writer = write_in_thread(map, 1, 3);
    read_some_events(&w, &mut buf, &mut scratch, &mut out);
    drop(std::mem::take(&mut out.finishes));
    let map = written(&writer);
    assert_eq!(w.dirty().counters().wp_faults.load(Relaxed), before + 1);
    assert_eq!(w.read(id, 0, 2).unwrap(), vec![2, 3]);
    w.release().unwrap();
    drop(ManuallyDrop::into_inner(map));
}

/// A detach unregisters its range before it lets go of the access lock, not after the
/// teardown (which waits a flush, here 1 s): a part of the range that another client
/// thread maps anew and attaches meanwhile keeps its registration. Unregistering late
/// silenced the new mirror's events (G1).
#[test]
fn a_slow_detach_leaves_a_range_attached_anew_registered() {
    let page = PAGE_SIZE as u64;
    let (w, _dev) = plain_space(&DeviceConfig {
        flush_latency: Duration::from_secs(1),
        ..DeviceConfig::default()
    });
    // Leaked, not unmapped, if an assertion fails (see above).
    let map = ManuallyDrop::new(memmap2::MmapMut::map_anon(4 * PAGE_SIZE).unwrap());
    let addr = map.as_ptr() as u64;
    let id = w.attach(addr, 4 * page).unwrap();
    w.read(id, 0, 8).unwrap();
    let detacher = {
        let w = Arc::clone(&w);
        std::thread::spawn(move || w.detach(id))
    };
    while w.list().iter().any(|m| m.id == id) {
        std::thread::yield_now();
    }
    // Another thread maps fresh memory over the first page and attaches it.
    let mut out = Deferred::default();
    map_over(&w, addr, PAGE_SIZE, &mut out);
    drop(std::mem::take(&mut out.finishes));
    let again = w.attach(addr, page).unwrap();
    detacher.join().unwrap().unwrap();
    assert_eq!(
        w.with_uffd(|u| u.unprotect(addr, page, false).map_err(|e| e.errno())),
        Some(Ok(())),
        "the range attached anew is still registered"
    );
    w.detach(again).unwrap();
    w.release().unwrap();
    drop(ManuallyDrop::into_inner(map));
}

/// An attach where the client unmapped a mirror whose device detach is still queued
/// neither fails nor waits for that detach. The detach waits for the client's open
/// invalidations, and one of them may need the access lock to end (a sync begins its
/// invalidations in batches, each under the lock, and finishes them all after the
/// last): an attach that detached the old mirror under the lock deadlocked with the
/// sync and the client's event reader. The stand-in for the sync waits 200 ms before
/// it needs the lock; the test fails by a 20 s deadline, not by hanging.
#[test]
fn attach_over_a_retired_mirror_waits_for_no_detach() {
    let page = PAGE_SIZE as u64;
    let (w, _dev) = plain_space(&DeviceConfig::default());
    // Leaked, not unmapped, if an assertion fails (see above).
    let keep = ManuallyDrop::new(memmap2::MmapMut::map_anon(4 * PAGE_SIZE).unwrap());
    let other = w.attach(keep.as_ptr() as u64, 4 * page).unwrap();
    let gone = ManuallyDrop::new(memmap2::MmapMut::map_anon(4 * PAGE_SIZE).unwrap());
    let addr = gone.as_ptr() as u64;
    w.attach(addr, 4 * page).unwrap();
    // The client maps something new over it in one call (no window for another test
    // thread to take the address): the old mapping's unmap event retires the device
    // mirror and queues its detach, which this test never runs.
    let mut out = Deferred::default();
    map_over(&w, addr, 4 * PAGE_SIZE, &mut out);
    let again = addr as *mut libc::c_void;
    assert_eq!(out.detach.len(), 1, "a retired mirror waits for its detach");
    drop(std::mem::take(&mut out.finishes));
    // A sync stand-in: an invalidation begun under the lock, ended only after taking
    // the lock again.
    let range = Range::new(keep.as_ptr() as u64, page).unwrap();
    let open = w
        .device()
        .lock_access()
        .begin_invalidate(InvalidateArgs::new(range, Event::SoftDirty))
        .unwrap();
    let sync = {
        let w = Arc::clone(&w);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(w.device().lock_access());
            open.finish();
        })
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let attacher = {
        let w = Arc::clone(&w);
        std::thread::spawn(move || {
            let _ = tx.send(w.attach(addr, 4 * page));
        })
    };
    let attached = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("attach deadlocked with an open invalidation that needs the access lock");
    assert!(attached.is_ok(), "{attached:?}");
    attacher.join().unwrap();
    sync.join().unwrap();
    w.detach(other).unwrap();
    w.release().unwrap();
    // SAFETY: the mapping made above, unused now.
    unsafe { libc::munmap(again, 4 * PAGE_SIZE) };
    drop(ManuallyDrop::into_inner(keep));
}
