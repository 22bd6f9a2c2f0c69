//! The definitions this library's wrappers stand in front of: the next `mmap`, `mremap` and
//! `malloc` family in the lookup order (`dlsym(RTLD_NEXT)`), found once, on first use.
//!
//! Until one is found (and while `dlsym` itself runs, since it may allocate), the wrappers
//! call glibc's own entry points instead: the system calls for `mmap`/`mremap`, and the
//! `__libc_*` names glibc exports for its allocator. Memory glibc's `dlsym` allocates that
//! way is glibc's own and freed by glibc.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

extern "C" {
    fn __libc_malloc(n: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(p: *mut c_void, n: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, n: usize) -> *mut c_void;
}

/// One definition found by name, cached as an address (0: not looked up yet; [`NONE`]:
/// there is none).
struct Slot {
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

impl Slot {
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

/// The next definition of a C function whose signature is `F` (a function pointer type).
struct Next<F> {
    slot: Slot,
    signature: PhantomData<F>,
}

impl<F: Copy> Next<F> {
    /// # Safety
    /// The C function `name` has the signature `F`.
    const unsafe fn new(name: &'static CStr) -> Next<F> {
        const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<usize>()) };
        Next {
            slot: Slot {
                name,
                addr: AtomicUsize::new(0),
            },
            signature: PhantomData,
        }
    }

    /// The next definition; `None` while it cannot be looked up yet, or if there is none.
    fn get(&self) -> Option<F> {
        // SAFETY: F is a function pointer type of the size of an address (checked in
        // `new`), and `new`'s caller declared that the function of this name has F's
        // signature.
        self.slot
            .get()
            .map(|a| unsafe { std::mem::transmute_copy(&a) })
    }
}

type MmapFn =
    unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, libc::off_t) -> *mut c_void;
type MremapFn = unsafe extern "C" fn(*mut c_void, usize, usize, c_int, *mut c_void) -> *mut c_void;
type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type MemalignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;

// SAFETY: mmap as <sys/mman.h> declares it.
static MMAP: Next<MmapFn> = unsafe { Next::new(c"mmap") };
// SAFETY: mremap as <sys/mman.h>, its variadic fifth argument fixed (hooks.rs says why) declares it.
static MREMAP: Next<MremapFn> = unsafe { Next::new(c"mremap") };
// SAFETY: malloc as <stdlib.h> declares it.
static MALLOC: Next<MallocFn> = unsafe { Next::new(c"malloc") };
// SAFETY: calloc as <stdlib.h> declares it.
static CALLOC: Next<CallocFn> = unsafe { Next::new(c"calloc") };
// SAFETY: realloc as <stdlib.h> declares it.
static REALLOC: Next<ReallocFn> = unsafe { Next::new(c"realloc") };
// SAFETY: memalign as <malloc.h> declares it.
static MEMALIGN: Next<MemalignFn> = unsafe { Next::new(c"memalign") };
// SAFETY: posix_memalign as <stdlib.h> declares it.
static POSIX_MEMALIGN: Next<PosixMemalignFn> = unsafe { Next::new(c"posix_memalign") };
// SAFETY: aligned_alloc as <stdlib.h> declares it.
static ALIGNED_ALLOC: Next<MemalignFn> = unsafe { Next::new(c"aligned_alloc") };

/// The `malloc` family's lookups.
fn malloc_family() -> [&'static Slot; 6] {
    [
        &MALLOC.slot,
        &CALLOC.slot,
        &REALLOC.slot,
        &MEMALIGN.slot,
        &POSIX_MEMALIGN.slot,
        &ALIGNED_ALLOC.slot,
    ]
}

/// True when the whole `malloc` family that follows this library is glibc's: only then do
/// its blocks carry glibc's chunk headers (`chunk.rs`). Another allocator preloaded after
/// this library, even for one of these names only, is left alone; one linked into the
/// program is found before this library and never reaches it.
pub fn malloc_is_glibcs() -> bool {
    let glibc = object_of(__libc_malloc as *const () as usize);
    glibc.is_some()
        && malloc_family()
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
    for n in [&MMAP.slot, &MREMAP.slot]
        .into_iter()
        .chain(malloc_family())
    {
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
    match MMAP.get() {
        // SAFETY: the caller's arguments, passed on as they came.
        Some(f) => unsafe { f(addr, len, prot, flags, fd, off) },
        // SAFETY: the mmap system call with the caller's arguments (what glibc's mmap does).
        None => unsafe {
            libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void
        },
    }
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
    match MREMAP.get() {
        // SAFETY: the caller's arguments, passed on as they came.
        Some(f) => unsafe { f(old, old_len, new_len, flags, new_addr) },
        // SAFETY: the mremap system call with the caller's arguments.
        None => unsafe {
            libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) as *mut c_void
        },
    }
}

/// The next `malloc`.
///
/// # Safety
/// As `malloc(3)`.
pub unsafe fn malloc(n: usize) -> *mut c_void {
    match MALLOC.get() {
        // SAFETY: the caller's arguments, passed on as they came.
        Some(f) => unsafe { f(n) },
        // SAFETY: glibc's allocator, exported under this name for such use.
        None => unsafe { __libc_malloc(n) },
    }
}

/// The next `calloc`.
///
/// # Safety
/// As `calloc(3)`.
pub unsafe fn calloc(n: usize, size: usize) -> *mut c_void {
    match CALLOC.get() {
        // SAFETY: the caller's arguments, passed on as they came.
        Some(f) => unsafe { f(n, size) },
        // SAFETY: glibc's allocator, exported under this name for such use.
        None => unsafe { __libc_calloc(n, size) },
    }
}

/// The next `realloc`.
///
/// # Safety
/// As `realloc(3)`.
pub unsafe fn realloc(p: *mut c_void, n: usize) -> *mut c_void {
    match REALLOC.get() {
        // SAFETY: the caller's arguments, passed on as they came.
        Some(f) => unsafe { f(p, n) },
        // SAFETY: glibc's allocator, exported under this name for such use.
        None => unsafe { __libc_realloc(p, n) },
    }
}

/// The next `memalign`.
///
/// # Safety
/// As `memalign(3)`.
pub unsafe fn memalign(align: usize, n: usize) -> *mut c_void {
    match MEMALIGN.get() {
        // SAFETY: the caller's arguments, passed on as they came.
        Some(f) => unsafe { f(align, n) },
        // SAFETY: glibc's allocator, exported under this name for such use.
        None => unsafe { __libc_memalign(align, n) },
    }
}

/// The next `aligned_alloc`.
///
/// # Safety
/// As `aligned_alloc(3)`.
pub unsafe fn aligned_alloc(align: usize, n: usize) -> *mut c_void {
    match ALIGNED_ALLOC.get() {
        // SAFETY: the caller's arguments, passed on as they came.
        Some(f) => unsafe { f(align, n) },
        // SAFETY: glibc's aligned_alloc is its memalign.
        None => unsafe { __libc_memalign(align, n) },
    }
}

/// The next `posix_memalign`.
///
/// # Safety
/// As `posix_memalign(3)`.
pub unsafe fn posix_memalign(out: *mut *mut c_void, align: usize, n: usize) -> c_int {
    match POSIX_MEMALIGN.get() {
        // SAFETY: the caller's arguments, passed on as they came.
        Some(f) => unsafe { f(out, align, n) },
        // SAFETY: the caller's arguments, as posix_memalign takes them.
        None => unsafe { libc_posix_memalign(out, align, n) },
    }
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
