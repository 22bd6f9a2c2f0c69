//! The definitions this library's wrappers stand in front of: the next `mmap`, `mremap` and
//! `malloc` family in the lookup order (`dlsym(RTLD_NEXT)`), found once, on first use.
//!
//! Until one is found (and while `dlsym` itself runs, since it may allocate), the wrappers
//! call glibc's own entry points instead: the system calls for `mmap`/`mremap`, and the
//! `__libc_*` names glibc exports for its allocator. Memory glibc's `dlsym` allocates that
//! way is glibc's own and freed by glibc.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};

extern "C" {
    fn __libc_malloc(n: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, n: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, n: usize) -> *mut c_void;
}

/// One definition found by name, cached as an address (0: not looked up yet; [`NONE`]:
/// there is none).
struct Next {
    name: &'static CStr,
    addr: AtomicUsize,
}

thread_local! {
    /// This thread runs a lookup: its wrappers use the fallbacks (`dlsym` may allocate).
    /// Per thread: another thread looks the name up itself rather than fall back meanwhile
    /// (a block of glibc's freed by another allocator would be corruption).
    static LOOKING_UP: Cell<bool> = const { Cell::new(false) };
}

/// The cached address of a name `dlsym` did not find.
const NONE: usize = 1;

impl Next {
    const fn new(name: &'static CStr) -> Next {
        Next {
            name,
            addr: AtomicUsize::new(0),
        }
    }

    /// The address of the next definition; `None` while it cannot be looked up yet, or if
    /// there is none.
    fn get(&self) -> Option<usize> {
        match self.addr.load(Ordering::Acquire) {
            NONE => return None,
            0 => {}
            a => return Some(a),
        }
        if LOOKING_UP.with(|l| l.replace(true)) {
            return None;
        }
        // SAFETY: dlsym with a valid NUL-terminated name; RTLD_NEXT is defined for a call
        // from a shared object. It returns null or the address of the symbol.
        let found = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
        LOOKING_UP.with(|l| l.set(false));
        self.addr
            .store(if found == 0 { NONE } else { found }, Ordering::Release);
        (found != 0).then_some(found)
    }
}

/// The function at `addr`, as a pointer of type `F`.
///
/// # Safety
/// `addr` is the address of a function whose C signature is `F`'s.
unsafe fn fn_at<F: Copy>(addr: usize) -> F {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<usize>()) };
    // SAFETY: F is a function pointer type of the size of an address (checked above), and
    // the caller guarantees the function at addr has F's signature.
    unsafe { std::mem::transmute_copy(&addr) }
}

static MMAP: Next = Next::new(c"mmap");
static MREMAP: Next = Next::new(c"mremap");
static MALLOC: Next = Next::new(c"malloc");
static CALLOC: Next = Next::new(c"calloc");
static REALLOC: Next = Next::new(c"realloc");
static MEMALIGN: Next = Next::new(c"memalign");
static POSIX_MEMALIGN: Next = Next::new(c"posix_memalign");
static ALIGNED_ALLOC: Next = Next::new(c"aligned_alloc");

type MmapFn =
    unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, libc::off_t) -> *mut c_void;
type MremapFn = unsafe extern "C" fn(*mut c_void, usize, usize, c_int, *mut c_void) -> *mut c_void;
type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type MemalignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;

/// True when the whole `malloc` family that follows this library is glibc's: only then do
/// its blocks carry glibc's chunk headers (`chunk.rs`). Another allocator preloaded after
/// this library, even for one of these names only, is left alone; one linked into the
/// program is found before this library and never reaches it.
pub fn malloc_is_glibcs() -> bool {
    let glibc = object_of(__libc_malloc as *const () as usize);
    glibc.is_some()
        && [
            &MALLOC,
            &CALLOC,
            &REALLOC,
            &MEMALIGN,
            &POSIX_MEMALIGN,
            &ALIGNED_ALLOC,
        ]
        .iter()
        .all(|n| n.get().is_some_and(|a| object_of(a) == glibc))
}

/// The base address of the shared object that holds `addr`.
fn object_of(addr: usize) -> Option<usize> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr fills the Dl_info we pass for an address; it only reads addr.
    let found = unsafe { libc::dladdr(addr as *const c_void, info.as_mut_ptr()) };
    // SAFETY: zero-initialised, and filled by dladdr when it returns non-zero.
    let info = unsafe { info.assume_init() };
    (found != 0).then_some(info.dli_fbase as usize)
}

/// Makes every lookup now, from the library's constructor (one thread, no lock held).
pub fn look_up_all() {
    for n in [
        &MMAP,
        &MREMAP,
        &MALLOC,
        &CALLOC,
        &REALLOC,
        &MEMALIGN,
        &POSIX_MEMALIGN,
        &ALIGNED_ALLOC,
    ] {
        let _ = n.get();
    }
}

/// The next `mmap`, or the system call.
///
/// # Safety
/// As `mmap(2)`.
pub unsafe fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    let Some(a) = MMAP.get() else {
        // SAFETY: the mmap system call with the caller's arguments (what glibc's mmap does).
        return unsafe {
            libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void
        };
    };
    // SAFETY: dlsym found this address for the name, whose C signature MmapFn is.
    let f: MmapFn = unsafe { fn_at(a) };
    // SAFETY: the caller's arguments, passed on as they came.
    unsafe { f(addr, len, prot, flags, fd, off) }
}

/// The next `mremap`, or the system call. `new_addr` is read only with `MREMAP_FIXED`.
///
/// # Safety
/// As `mremap(2)`.
pub unsafe fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let Some(a) = MREMAP.get() else {
        // SAFETY: the mremap system call with the caller's arguments.
        return unsafe {
            libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) as *mut c_void
        };
    };
    // SAFETY: dlsym found this address for the name, whose C signature MremapFn is.
    let f: MremapFn = unsafe { fn_at(a) };
    // SAFETY: the caller's arguments, passed on as they came.
    unsafe { f(old, old_len, new_len, flags, new_addr) }
}

/// The next `malloc`.
///
/// # Safety
/// As `malloc(3)`.
pub unsafe fn malloc(n: usize) -> *mut c_void {
    let Some(a) = MALLOC.get() else {
        // SAFETY: glibc's allocator, exported under this name for such use.
        return unsafe { __libc_malloc(n) };
    };
    // SAFETY: dlsym found this address for the name, whose C signature MallocFn is.
    let f: MallocFn = unsafe { fn_at(a) };
    // SAFETY: the caller's arguments, passed on as they came.
    unsafe { f(n) }
}

/// The next `calloc`.
///
/// # Safety
/// As `calloc(3)`.
pub unsafe fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(a) = CALLOC.get() else {
        // SAFETY: glibc's allocator, exported under this name for such use.
        return unsafe { __libc_calloc(n, size) };
    };
    // SAFETY: dlsym found this address for the name, whose C signature CallocFn is.
    let f: CallocFn = unsafe { fn_at(a) };
    // SAFETY: the caller's arguments, passed on as they came.
    unsafe { f(n, size) }
}

/// The next `realloc`.
///
/// # Safety
/// As `realloc(3)`.
pub unsafe fn realloc(p: *mut c_void, n: usize) -> *mut c_void {
    let Some(a) = REALLOC.get() else {
        // SAFETY: glibc's allocator, exported under this name for such use.
        return unsafe { __libc_realloc(p, n) };
    };
    // SAFETY: dlsym found this address for the name, whose C signature ReallocFn is.
    let f: ReallocFn = unsafe { fn_at(a) };
    // SAFETY: the caller's arguments, passed on as they came.
    unsafe { f(p, n) }
}

/// The next `memalign`.
///
/// # Safety
/// As `memalign(3)`.
pub unsafe fn memalign(align: usize, n: usize) -> *mut c_void {
    let Some(a) = MEMALIGN.get() else {
        // SAFETY: glibc's allocator, exported under this name for such use.
        return unsafe { __libc_memalign(align, n) };
    };
    // SAFETY: dlsym found this address for the name, whose C signature MemalignFn is.
    let f: MemalignFn = unsafe { fn_at(a) };
    // SAFETY: the caller's arguments, passed on as they came.
    unsafe { f(align, n) }
}

/// The next `aligned_alloc`.
///
/// # Safety
/// As `aligned_alloc(3)`.
pub unsafe fn aligned_alloc(align: usize, n: usize) -> *mut c_void {
    let Some(a) = ALIGNED_ALLOC.get() else {
        // SAFETY: glibc's aligned_alloc is its memalign.
        return unsafe { __libc_memalign(align, n) };
    };
    // SAFETY: dlsym found this address for the name, whose C signature MemalignFn is.
    let f: MemalignFn = unsafe { fn_at(a) };
    // SAFETY: the caller's arguments, passed on as they came.
    unsafe { f(align, n) }
}

/// The next `posix_memalign`.
///
/// # Safety
/// As `posix_memalign(3)`.
pub unsafe fn posix_memalign(out: *mut *mut c_void, align: usize, n: usize) -> c_int {
    let Some(a) = POSIX_MEMALIGN.get() else {
        // SAFETY: the caller's arguments, as posix_memalign takes them.
        return unsafe { libc_posix_memalign(out, align, n) };
    };
    // SAFETY: dlsym found this address for the name, whose C signature PosixMemalignFn is.
    let f: PosixMemalignFn = unsafe { fn_at(a) };
    // SAFETY: the caller's arguments, passed on as they came.
    unsafe { f(out, align, n) }
}

/// `posix_memalign` over glibc's own `memalign`, for the time before the lookup.
///
/// # Safety
/// As `posix_memalign(3)`.
unsafe fn libc_posix_memalign(out: *mut *mut c_void, align: usize, n: usize) -> c_int {
    if align % std::mem::size_of::<usize>() != 0 || !align.is_power_of_two() {
        return libc::EINVAL;
    }
    // SAFETY: glibc's allocator, exported under this name for such use.
    let p = unsafe { __libc_memalign(align, n) };
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller passes a valid pointer to store the result in.
    unsafe { out.write(p) };
    0
}
