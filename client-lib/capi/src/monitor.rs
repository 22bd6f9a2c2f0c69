//! The C API of monitors (since 0.2): `memshadow_monitor_*`, over `memshadow::Monitor` and
//! `memshadow::MonitorEvents` (docs/monitors.md).

use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::os::fd::AsRawFd;
use std::sync::{Mutex, PoisonError};

use memshadow::{Monitor, MonitorEvent};

use super::{guard, guard_value, handle, invalid, out_ptr, put, Failure, FfiClient, Status};

/// A monitor handle (`struct memshadow_monitor`, since 0.2): a watched range of this
/// process's memory, valid until the range is unmapped, moved (`mremap`) or discarded
/// (`madvise(MADV_DONTNEED/FREE/REMOVE)`); once invalid it stays invalid. The checks
/// (`memshadow_monitor_is_valid`, `_read_begin`, `_read_retry`) make no system call and may
/// be called from any thread at once; a check that starts after the `munmap`, `mremap`,
/// `madvise`, or a `free()` that unmapped the range, returned, in any thread, says invalid.
#[derive(Debug)]
pub struct FfiMonitor {
    monitor: Monitor,
}

/// The pending events of a client's monitor queue, for `memshadow_monitor_events`.
#[derive(Debug, Default)]
pub(crate) struct PendingEvents {
    events: VecDeque<MonitorEvent>,
    overflowed: bool,
}

/// Pending events of each client: the queue is drained into it and handed out in pieces.
pub(crate) type Pending = Mutex<PendingEvents>;

/// One event of a client's monitor queue (`memshadow_monitor_events`, since 0.2): monitor
/// `slot` was invalidated and now has generation `generation`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct memshadow_monitor_event {
    /// The monitor's slot (`memshadow_monitor_slot`).
    pub slot: u32,
    /// Why: 1 unmap (`munmap`, the source of an `mremap`), 2 clear (`madvise`), other
    /// values for kinds a newer daemon reports.
    pub kind: u32,
    /// The monitor's generation now.
    pub generation: u64,
    /// The invalidated part of the monitor: first byte.
    pub start: u64,
    /// One past its last byte.
    pub end: u64,
}

/// Watches the `len` bytes at `ptr` of this process (rounded out to pages; already
/// mapped, anonymous or shared memory). On success `*out` is a new monitor handle (free it
/// with `memshadow_monitor_free`, which stops it); on failure `*out` is NULL.
/// `MEMSHADOW_ERR_BAD_RANGE` if the range is empty, not mapped or a file on disk;
/// `MEMSHADOW_ERR_QUOTA_EXCEEDED` past 131072 monitors of the client (or the daemon's
/// limit per user); `MEMSHADOW_ERR_UNSUPPORTED` if the daemon has no monitors
/// (protocol 4). Since 0.2.
///
/// # Safety
/// `client` is NULL or a live client handle; `out` is NULL or valid for writing a pointer.
/// `ptr` is only an address (never dereferenced here).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_monitor_add(
    client: *const FfiClient,
    ptr: *const c_void,
    len: usize,
    out: *mut *mut FfiMonitor,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, "out") }?;
        // SAFETY: the caller's contract.
        let client = unsafe { handle(client, "client") }?;
        let monitor = client.client.monitor(ptr.cast(), len)?;
        let m = Box::into_raw(Box::new(FfiMonitor { monitor }));
        // SAFETY: checked by `out_ptr`.
        unsafe { put(out, m) };
        Ok(())
    })
}

/// Runs `f` on the monitor behind a handle.
///
/// # Safety
/// `monitor` is NULL or a live monitor handle.
unsafe fn on_monitor<T>(
    monitor: *const FfiMonitor,
    f: impl FnOnce(&Monitor) -> T,
) -> Result<T, Failure> {
    // SAFETY: the caller's contract.
    Ok(f(&unsafe { handle(monitor, "monitor") }?.monitor))
}

/// 1 while nothing unmapped, moved or discarded any of the range, else 0 (also for NULL).
/// No system call: two loads from memory shared with the daemon. Since 0.2.
///
/// # Safety
/// `monitor` is NULL or a live monitor handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_monitor_is_valid(monitor: *const FfiMonitor) -> c_int {
    // SAFETY: the caller's contract.
    let valid = guard_value(false, || unsafe { on_monitor(monitor, Monitor::is_valid) }).0;
    c_int::from(valid)
}

/// Begins a use of the range (registering it with a NIC, say), as the kernel's
/// `mmu_interval_read_begin`: returns the sequence to pass to `memshadow_monitor_read_retry`
/// when the use is done. No system call. Since 0.2.
///
/// # Safety
/// `monitor` is NULL or a live monitor handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_monitor_read_begin(monitor: *const FfiMonitor) -> u64 {
    // SAFETY: the caller's contract.
    guard_value(u64::MAX, || unsafe {
        on_monitor(monitor, Monitor::read_begin)
    })
    .0
}

/// 1 if the use begun at `seq` must be undone and redone, as the kernel's
/// `mmu_interval_read_retry`: the range changed since (or the monitor was invalid already,
/// or `monitor` is NULL); 0 if the use is good. No system call. Since 0.2.
///
/// # Safety
/// `monitor` is NULL or a live monitor handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_monitor_read_retry(
    monitor: *const FfiMonitor,
    seq: u64,
) -> c_int {
    // SAFETY: the caller's contract.
    let retry = guard_value(true, || unsafe {
        on_monitor(monitor, |m| m.read_retry(seq))
    })
    .0;
    c_int::from(retry)
}

/// The monitor's slot, which its events name (`UINT32_MAX` if `monitor` is NULL).
/// Since 0.2.
///
/// # Safety
/// `monitor` is NULL or a live monitor handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_monitor_slot(monitor: *const FfiMonitor) -> u32 {
    // SAFETY: the caller's contract.
    guard_value(u32::MAX, || unsafe { on_monitor(monitor, Monitor::slot) }).0
}

/// The generation the monitor was made with (0 if `monitor` is NULL): an event of its slot
/// with a newer generation is about this monitor; one with an older generation was about
/// a monitor that had the slot before. Since 0.2.
///
/// # Safety
/// `monitor` is NULL or a live monitor handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_monitor_generation(monitor: *const FfiMonitor) -> u64 {
    // SAFETY: the caller's contract.
    guard_value(0, || unsafe { on_monitor(monitor, Monitor::generation) }).0
}

/// Stores the watched range (rounded out to pages) in `*addr` and `*len`. Since 0.2.
///
/// # Safety
/// `monitor` is NULL or a live monitor handle; `addr` and `len` are NULL or valid for
/// writing a `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_monitor_range(
    monitor: *const FfiMonitor,
    addr: *mut u64,
    len: *mut u64,
) -> Status {
    guard(|| {
        if addr.is_null() || len.is_null() {
            return Err(invalid("addr or len is NULL"));
        }
        // SAFETY: the caller's contract.
        let (a, l) = unsafe { on_monitor(monitor, Monitor::range) }?;
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(addr, a) };
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(len, l) };
        Ok(())
    })
}

/// Stops the monitor and frees the handle. NULL is ignored. No other thread may use the
/// handle meanwhile. Since 0.2.
///
/// # Safety
/// `monitor` is NULL or a handle from `memshadow_monitor_add` not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_monitor_free(monitor: *mut FfiMonitor) {
    // SAFETY: the caller's contract is `free_handle`'s.
    unsafe { super::free_handle(monitor) }
}

/// The doorbell of the client's monitor queue, a file descriptor (a pipe's read end) that
/// becomes readable when events wait: wait for `POLLIN`/`EPOLLIN`, then call
/// `memshadow_monitor_events`. Do not read, write or close it; it stays valid until the
/// client is freed. A negative `memshadow_status` on failure. Since 0.2.
///
/// # Safety
/// `client` is NULL or a live client handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_monitor_events_fd(client: *const FfiClient) -> c_int {
    let (fd, status) = guard_value(-1, || {
        // SAFETY: the caller's contract.
        let c = unsafe { handle(client, "client") }?;
        let ev = c.client.monitor_events()?;
        Ok(ev.fd().as_raw_fd())
    });
    if status == Status::MEMSHADOW_OK {
        fd
    } else {
        status as c_int
    }
}

/// Takes up to `cap` waiting events of the client's monitors into `events`, in the order
/// they happened, and stores how many in `*n_out`. `*overflowed_out` is 1 if events were
/// lost because the queue was full since the last call: then check every monitor with
/// `memshadow_monitor_is_valid`. Events not taken stay for the next call, and the doorbell
/// does not ring again for them: call again until `*n_out < cap`. It waits only while the
/// daemon applies a batch of this process's address-space events (so the events of a change
/// that returned before the call are in it), and the first call of a client sets its
/// monitors up (one round trip). Since 0.2.
///
/// # Safety
/// `client` is NULL or a live client handle; `events` is NULL (with `cap` 0) or valid for
/// writing `cap` events; `n_out` and `overflowed_out` are NULL or valid for writing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_monitor_events(
    client: *const FfiClient,
    events: *mut memshadow_monitor_event,
    cap: usize,
    n_out: *mut usize,
    overflowed_out: *mut c_int,
) -> Status {
    guard(|| {
        if n_out.is_null() || overflowed_out.is_null() || (events.is_null() && cap > 0) {
            return Err(invalid("events, n_out or overflowed_out is NULL"));
        }
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(n_out, 0) };
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(overflowed_out, 0) };
        // SAFETY: the caller's contract.
        let c = unsafe { handle(client, "client") }?;
        let ev = c.client.monitor_events()?;
        let mut p = c
            .monitor_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if p.events.is_empty() {
            let mut fresh = Vec::new();
            let d = ev.drain(&mut fresh);
            p.events.extend(fresh);
            p.overflowed |= d.overflowed;
        }
        let n = cap.min(p.events.len());
        for (i, e) in p.events.drain(..n).enumerate() {
            let out = memshadow_monitor_event {
                slot: e.slot,
                kind: e.kind.map_or(0, |k| u32::from(k.code())),
                generation: e.gen,
                start: e.start,
                end: e.end,
            };
            // SAFETY: `i < n <= cap`, and the caller's contract makes `events` valid for
            // `cap` events: the offset stays inside that allocation.
            let slot = unsafe { events.add(i) };
            // SAFETY: as above, `slot` is valid for writing an event.
            unsafe { put(slot, out) };
        }
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(n_out, n) };
        let overflowed = c_int::from(std::mem::take(&mut p.overflowed));
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(overflowed_out, overflowed) };
        Ok(())
    })
}
