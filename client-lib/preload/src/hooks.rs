//! The symbols this library defines in front of the C library's (docs/preload.md says
//! which and why). Each calls the next definition first and returns its result unchanged;
//! only then, and only for a result at or above the policy's threshold, does it look at
//! what the program got, on [`guarded`]: never re-entered on one thread (the library's own
//! allocations and a signal handler that maps memory while the library works pass straight
//! through), and a panic is caught and turns the library off rather than reach the program.
//!
//! Not wrapped: `munmap`, `free`, `madvise` (the kernel reports them to the daemon by the
//! userfaultfd; nothing needs doing in the program), `brk`/`sbrk` (glibc calls its own;
//! the heap's growth is looked at from the `malloc` wrappers instead), and glibc's
//! internal calls (its `malloc` maps memory through its own `mmap`, seen here as the block
//! `malloc` returns).

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::Ordering;

use crate::real;
use crate::session::{self, HEAP_ON, MALLOC_MIN, MAP_MIN};

thread_local! {
    /// This thread is inside the library's own work.
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

extern "C" {
    // Not in the libc crate for glibc targets.
    fn pthread_setcancelstate(state: c_int, old: *mut c_int) -> c_int;
}
/// glibc's `PTHREAD_CANCEL_DISABLE`.
const PTHREAD_CANCEL_DISABLE: c_int = 1;

/// Runs `f` unless this thread is already inside the library; a panic turns it off. The
/// caller's `errno` is kept: the program sees the one its call left. Cancellation is held
/// off meanwhile: the library's `sendmsg` and `recvmsg` are cancellation points, and a
/// cancellation unwinding through it would end the process; it takes effect at the
/// program's next cancellation point instead, as without the library.
fn guarded(f: impl FnOnce()) {
    let entered = BUSY.with(|b| !b.replace(true));
    if !entered {
        return;
    }
    let mut cancel_state: c_int = 0;
    // SAFETY: sets this thread's cancelability, storing the old state in a local.
    unsafe { pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &mut cancel_state) };
    // SAFETY: __errno_location returns this thread's errno, valid for the thread's life.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: as above: a valid, aligned int of this thread.
    let saved = unsafe { errno.read() };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    // SAFETY: restores the state stored above (a pending cancellation then waits for the
    // program's next cancellation point).
    unsafe { pthread_setcancelstate(cancel_state, std::ptr::null_mut()) };
    // SAFETY: as above.
    unsafe { errno.write(saved) };
    if outcome.is_err() {
        session::turn_off();
    }
    BUSY.with(|b| b.set(false));
}

/// After a `malloc`-family call that returned `p` for `n` bytes.
fn allocated(p: *mut c_void, n: usize, grown: bool) {
    if n >= MALLOC_MIN.load(Ordering::Relaxed) && !p.is_null() {
        // SAFETY: p was just returned by glibc's allocator (MALLOC_MIN is finite only when
        // the next malloc is glibc's) and is not freed before this returns.
        guarded(|| unsafe { session::allocated(p, grown) });
    }
    if HEAP_ON.load(Ordering::Relaxed) && session::heap_moved() {
        guarded(session::heap_grew);
    }
}

/// `mmap(2)`: anonymous mappings of at least the minimum size are attached.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: the caller's arguments, passed on.
    let r = unsafe { real::mmap(addr, len, prot, flags, fd, off) };
    if r != libc::MAP_FAILED && len >= MAP_MIN.load(Ordering::Relaxed) {
        guarded(|| session::mapped(r, len, prot, flags));
    }
    r
}

/// `mmap64`: the same function under its large-file name.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: as mmap.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// `mremap(2)`: a mirrored mapping that grows, or moves, stays mirrored whole.
///
/// C declares it variadic; the fifth argument exists only with `MREMAP_FIXED`. On the
/// 64-bit Linux ABIs this library is built for, a variadic call passes its arguments where
/// a fixed one does, so it is declared with all five and the fifth is passed on untouched.
///
/// # Safety
/// As `mremap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    // SAFETY: the caller's arguments, passed on.
    let r = unsafe { real::mremap(old, old_len, new_len, flags, new_addr) };
    if r != libc::MAP_FAILED && new_len >= MAP_MIN.load(Ordering::Relaxed) {
        guarded(|| session::remapped(r, new_len));
    }
    r
}

/// `malloc(3)`.
///
/// # Safety
/// As `malloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn malloc(n: usize) -> *mut c_void {
    // SAFETY: the caller's argument, passed on.
    let p = unsafe { real::malloc(n) };
    allocated(p, n, false);
    p
}

/// `calloc(3)`.
///
/// # Safety
/// As `calloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: the caller's arguments, passed on.
    let p = unsafe { real::calloc(n, size) };
    allocated(p, n.saturating_mul(size), false);
    p
}

/// `realloc(3)`: glibc moves a mapped block with `mremap`, which the daemon follows; what
/// the block grew by is attached.
///
/// # Safety
/// As `realloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn realloc(old: *mut c_void, n: usize) -> *mut c_void {
    // SAFETY: the caller's arguments, passed on.
    let p = unsafe { real::realloc(old, n) };
    allocated(p, n, true);
    p
}

/// `memalign(3)`.
///
/// # Safety
/// As `memalign(3)`.
#[no_mangle]
pub unsafe extern "C" fn memalign(align: usize, n: usize) -> *mut c_void {
    // SAFETY: the caller's arguments, passed on.
    let p = unsafe { real::memalign(align, n) };
    allocated(p, n, false);
    p
}

/// `aligned_alloc(3)`.
///
/// # Safety
/// As `aligned_alloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, n: usize) -> *mut c_void {
    // SAFETY: the caller's arguments, passed on.
    let p = unsafe { real::aligned_alloc(align, n) };
    allocated(p, n, false);
    p
}

/// `posix_memalign(3)`.
///
/// # Safety
/// As `posix_memalign(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, n: usize) -> c_int {
    // SAFETY: the caller's arguments, passed on.
    let r = unsafe { real::posix_memalign(out, align, n) };
    if r == 0 {
        // SAFETY: on success posix_memalign stored the block at out.
        allocated(unsafe { out.read() }, n, false);
    }
    r
}

/// Runs the library's start (`f`) as its own work: what it allocates and maps is the
/// library's, not the program's.
pub fn during_start(f: impl FnOnce()) {
    guarded(f);
}
