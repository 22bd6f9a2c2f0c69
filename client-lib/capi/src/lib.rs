//! The C ABI of libmemshadow (`libmemshadow.so`/`.a`, header `../include/memshadow.h`
//! generated from this file by cbindgen; `tests/header.rs` fails when it is stale), over
//! the Rust library, the `memshadow` crate.
//!
//! It mirrors the Rust API: [`Client`], [`Mirror`] and [`memshadow::Engine`] behind opaque
//! handles, every [`Error`] variant as one [`Status`] code, the message in
//! [`memshadow_last_error`] and the errno behind it in [`memshadow_last_errno`]. Every byte
//! length, offset into a mirror and count is a `size_t`; ids, counter values and times are
//! `uint64_t`. Client, mirror and stats handles may be shared between threads; an engine
//! handle is used by one thread at a time (the Rust `Engine` is `Send`, not `Sync`).
//!
//! Versioning (README "Using the C library"): the SONAME is `libmemshadow.so.MAJOR`
//! (`build.rs`); within a major version entry points and codes are only added, never
//! changed or removed, so a program built against 0.x runs with any later 0.y.
//! `MEMSHADOW_VERSION_MAJOR/MINOR/PATCH` in the header are the version it was built
//! against, [`memshadow_version`] the one loaded at run time. What a minor version added
//! says "Since 0.y" in its documentation (so in the header), and its functions are listed
//! in the version node `MEMSHADOW_0.y` of `memshadow.map` (`tests/capi.rs` checks both
//! agree); everything after 0.1 is 0.2.
//! Nothing unwinds across the boundary (every entry point runs under `catch_unwind` and
//! turns a panic into `MEMSHADOW_ERR_INTERNAL`), and every pointer argument is checked for
//! NULL (`MEMSHADOW_ERR_INVALID_ARGUMENT`).
//!
//! Adding an entry point for a new `Mirror` method is one function: see
//! [`memshadow_mirror_populate`] (`on_mirror` + `guard`).

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use memshadow::{Client, Error, Mirror};

/// Result codes of the C API: `MEMSHADOW_OK` (0) or a negative error, one per error kind
/// of the Rust library; `memshadow_last_error()` has the details. Values are stable.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum Status {
    /// Success.
    MEMSHADOW_OK = 0,
    /// A NULL pointer or otherwise unusable argument; nothing was done.
    MEMSHADOW_ERR_INVALID_ARGUMENT = -1,
    /// A bug in libmemshadow (a caught panic); the handle may be unusable.
    MEMSHADOW_ERR_INTERNAL = -2,
    /// No socket path: `MEMSHADOW_SOCKET` is not set, nothing is at the system socket, and
    /// neither is this process root nor is `XDG_RUNTIME_DIR` set.
    MEMSHADOW_ERR_NO_SOCKET_PATH = -3,
    /// The daemon's socket could not be reached.
    MEMSHADOW_ERR_CONNECT = -4,
    /// The daemon went away (or is shutting down).
    MEMSHADOW_ERR_DAEMON_GONE = -5,
    /// No protocol version in common with the daemon.
    MEMSHADOW_ERR_PROTOCOL_VERSION = -6,
    /// This process is not dumpable (after setuid?), so the daemon could not read it.
    MEMSHADOW_ERR_NOT_DUMPABLE = -7,
    /// A userfaultfd could not be created.
    MEMSHADOW_ERR_UFFD = -8,
    /// Opening a file under `/proc/self` failed.
    MEMSHADOW_ERR_PROC = -9,
    /// The address is not (or no longer) mirrored, e.g. it was unmapped.
    MEMSHADOW_ERR_NOT_MIRRORED = -10,
    /// No such mirror (e.g. already detached).
    MEMSHADOW_ERR_NO_SUCH_MIRROR = -11,
    /// A quota of this client would be exceeded.
    MEMSHADOW_ERR_QUOTA_EXCEEDED = -12,
    /// Another userfaultfd already watches the range.
    MEMSHADOW_ERR_ALREADY_WATCHED = -13,
    /// A bogus range: empty, not page aligned, not mapped, or outside the mirror.
    MEMSHADOW_ERR_BAD_RANGE = -14,
    /// The range overlaps an attached range.
    MEMSHADOW_ERR_OVERLAP = -15,
    /// The daemon has too many clients.
    MEMSHADOW_ERR_TOO_MANY_CLIENTS = -16,
    /// Not allowed: refused by the daemon, or by its socket (then `memshadow_last_errno()` is
    /// `EACCES` or `EPERM`, and the message says which group to join).
    MEMSHADOW_ERR_PERMISSION_DENIED = -17,
    /// The exchange broke the protocol.
    MEMSHADOW_ERR_PROTOCOL = -18,
    /// The daemon refused for another reason (see the message).
    MEMSHADOW_ERR_DAEMON = -19,
    /// A socket error.
    MEMSHADOW_ERR_SOCKET = -20,
    /// No connected client with that pid (control requests).
    MEMSHADOW_ERR_NO_SUCH_CLIENT = -21,
    /// The daemon cannot do it here (e.g. no dirty tracking for this client).
    MEMSHADOW_ERR_UNSUPPORTED = -22,
    /// The daemon's shadow buffer has no room left for this client (not its own quota).
    MEMSHADOW_ERR_SHADOW_FULL = -23,
    /// The daemon ran out of a system resource (file descriptors, memory); try again later.
    MEMSHADOW_ERR_OUT_OF_RESOURCES = -24,
    /// No grant with that token: wrong, revoked (its mirror was detached or its client
    /// exited), or another user's (`memshadow_engine_attach`). Since 0.2.
    MEMSHADOW_ERR_NO_SUCH_GRANT = -25,
    /// This engine was evicted: it did not acknowledge a flush in time, so the daemon no
    /// longer waits for it; what it reads can no longer be trusted. Free it. Since 0.2.
    MEMSHADOW_ERR_EVICTED = -26,
}

impl Status {
    /// The code of a library error. A new [`Error`] variant must be given a code here
    /// (append it; never renumber) and a case in the test
    /// `every_error_variant_has_a_distinct_code_and_name`: `Error` is `#[non_exhaustive]`,
    /// so this match cannot be exhaustive and one forgotten falls to
    /// `MEMSHADOW_ERR_INTERNAL` (a bug of this library, as its code says).
    fn of(e: &Error) -> Status {
        match e {
            Error::NoSocketPath => Status::MEMSHADOW_ERR_NO_SOCKET_PATH,
            Error::Connect { .. } => Status::MEMSHADOW_ERR_CONNECT,
            Error::DaemonGone => Status::MEMSHADOW_ERR_DAEMON_GONE,
            Error::ProtocolVersion(_) => Status::MEMSHADOW_ERR_PROTOCOL_VERSION,
            Error::NotDumpable(_) => Status::MEMSHADOW_ERR_NOT_DUMPABLE,
            Error::Uffd(_) => Status::MEMSHADOW_ERR_UFFD,
            Error::Proc(..) => Status::MEMSHADOW_ERR_PROC,
            Error::NotMirrored(_) => Status::MEMSHADOW_ERR_NOT_MIRRORED,
            Error::NoSuchMirror(_) => Status::MEMSHADOW_ERR_NO_SUCH_MIRROR,
            Error::QuotaExceeded(_) => Status::MEMSHADOW_ERR_QUOTA_EXCEEDED,
            Error::AlreadyWatched(_) => Status::MEMSHADOW_ERR_ALREADY_WATCHED,
            Error::BadRange(_) => Status::MEMSHADOW_ERR_BAD_RANGE,
            Error::InvalidArgument(_) => Status::MEMSHADOW_ERR_INVALID_ARGUMENT,
            Error::Overlap(_) => Status::MEMSHADOW_ERR_OVERLAP,
            Error::TooManyClients(_) => Status::MEMSHADOW_ERR_TOO_MANY_CLIENTS,
            Error::PermissionDenied(_) | Error::ConnectDenied { .. } => {
                Status::MEMSHADOW_ERR_PERMISSION_DENIED
            }
            Error::Protocol(_) => Status::MEMSHADOW_ERR_PROTOCOL,
            Error::Daemon { .. } => Status::MEMSHADOW_ERR_DAEMON,
            Error::Socket(_) => Status::MEMSHADOW_ERR_SOCKET,
            Error::NoSuchClient(_) => Status::MEMSHADOW_ERR_NO_SUCH_CLIENT,
            Error::Unsupported(_) => Status::MEMSHADOW_ERR_UNSUPPORTED,
            Error::ShadowFull(_) => Status::MEMSHADOW_ERR_SHADOW_FULL,
            Error::OutOfResources(_) => Status::MEMSHADOW_ERR_OUT_OF_RESOURCES,
            Error::NoSuchGrant(_) => Status::MEMSHADOW_ERR_NO_SUCH_GRANT,
            Error::Evicted(_) => Status::MEMSHADOW_ERR_EVICTED,
            _ => Status::MEMSHADOW_ERR_INTERNAL,
        }
    }

    /// The constant's name, for messages.
    fn name(self) -> &'static CStr {
        match self {
            Status::MEMSHADOW_OK => c"MEMSHADOW_OK",
            Status::MEMSHADOW_ERR_INVALID_ARGUMENT => c"MEMSHADOW_ERR_INVALID_ARGUMENT",
            Status::MEMSHADOW_ERR_INTERNAL => c"MEMSHADOW_ERR_INTERNAL",
            Status::MEMSHADOW_ERR_NO_SOCKET_PATH => c"MEMSHADOW_ERR_NO_SOCKET_PATH",
            Status::MEMSHADOW_ERR_CONNECT => c"MEMSHADOW_ERR_CONNECT",
            Status::MEMSHADOW_ERR_DAEMON_GONE => c"MEMSHADOW_ERR_DAEMON_GONE",
            Status::MEMSHADOW_ERR_PROTOCOL_VERSION => c"MEMSHADOW_ERR_PROTOCOL_VERSION",
            Status::MEMSHADOW_ERR_NOT_DUMPABLE => c"MEMSHADOW_ERR_NOT_DUMPABLE",
            Status::MEMSHADOW_ERR_UFFD => c"MEMSHADOW_ERR_UFFD",
            Status::MEMSHADOW_ERR_PROC => c"MEMSHADOW_ERR_PROC",
            Status::MEMSHADOW_ERR_NOT_MIRRORED => c"MEMSHADOW_ERR_NOT_MIRRORED",
            Status::MEMSHADOW_ERR_NO_SUCH_MIRROR => c"MEMSHADOW_ERR_NO_SUCH_MIRROR",
            Status::MEMSHADOW_ERR_QUOTA_EXCEEDED => c"MEMSHADOW_ERR_QUOTA_EXCEEDED",
            Status::MEMSHADOW_ERR_ALREADY_WATCHED => c"MEMSHADOW_ERR_ALREADY_WATCHED",
            Status::MEMSHADOW_ERR_BAD_RANGE => c"MEMSHADOW_ERR_BAD_RANGE",
            Status::MEMSHADOW_ERR_OVERLAP => c"MEMSHADOW_ERR_OVERLAP",
            Status::MEMSHADOW_ERR_TOO_MANY_CLIENTS => c"MEMSHADOW_ERR_TOO_MANY_CLIENTS",
            Status::MEMSHADOW_ERR_PERMISSION_DENIED => c"MEMSHADOW_ERR_PERMISSION_DENIED",
            Status::MEMSHADOW_ERR_PROTOCOL => c"MEMSHADOW_ERR_PROTOCOL",
            Status::MEMSHADOW_ERR_DAEMON => c"MEMSHADOW_ERR_DAEMON",
            Status::MEMSHADOW_ERR_SOCKET => c"MEMSHADOW_ERR_SOCKET",
            Status::MEMSHADOW_ERR_NO_SUCH_CLIENT => c"MEMSHADOW_ERR_NO_SUCH_CLIENT",
            Status::MEMSHADOW_ERR_UNSUPPORTED => c"MEMSHADOW_ERR_UNSUPPORTED",
            Status::MEMSHADOW_ERR_SHADOW_FULL => c"MEMSHADOW_ERR_SHADOW_FULL",
            Status::MEMSHADOW_ERR_OUT_OF_RESOURCES => c"MEMSHADOW_ERR_OUT_OF_RESOURCES",
            Status::MEMSHADOW_ERR_NO_SUCH_GRANT => c"MEMSHADOW_ERR_NO_SUCH_GRANT",
            Status::MEMSHADOW_ERR_EVICTED => c"MEMSHADOW_ERR_EVICTED",
        }
    }

    /// Every code, for [`memshadow_status_name`] and the tests.
    const ALL: [Status; 27] = [
        Status::MEMSHADOW_OK,
        Status::MEMSHADOW_ERR_INVALID_ARGUMENT,
        Status::MEMSHADOW_ERR_INTERNAL,
        Status::MEMSHADOW_ERR_NO_SOCKET_PATH,
        Status::MEMSHADOW_ERR_CONNECT,
        Status::MEMSHADOW_ERR_DAEMON_GONE,
        Status::MEMSHADOW_ERR_PROTOCOL_VERSION,
        Status::MEMSHADOW_ERR_NOT_DUMPABLE,
        Status::MEMSHADOW_ERR_UFFD,
        Status::MEMSHADOW_ERR_PROC,
        Status::MEMSHADOW_ERR_NOT_MIRRORED,
        Status::MEMSHADOW_ERR_NO_SUCH_MIRROR,
        Status::MEMSHADOW_ERR_QUOTA_EXCEEDED,
        Status::MEMSHADOW_ERR_ALREADY_WATCHED,
        Status::MEMSHADOW_ERR_BAD_RANGE,
        Status::MEMSHADOW_ERR_OVERLAP,
        Status::MEMSHADOW_ERR_TOO_MANY_CLIENTS,
        Status::MEMSHADOW_ERR_PERMISSION_DENIED,
        Status::MEMSHADOW_ERR_PROTOCOL,
        Status::MEMSHADOW_ERR_DAEMON,
        Status::MEMSHADOW_ERR_SOCKET,
        Status::MEMSHADOW_ERR_NO_SUCH_CLIENT,
        Status::MEMSHADOW_ERR_UNSUPPORTED,
        Status::MEMSHADOW_ERR_SHADOW_FULL,
        Status::MEMSHADOW_ERR_OUT_OF_RESOURCES,
        Status::MEMSHADOW_ERR_NO_SUCH_GRANT,
        Status::MEMSHADOW_ERR_EVICTED,
    ];
}

/// A failed call: the code, the message for [`memshadow_last_error`] and the errno for
/// [`memshadow_last_errno`].
#[derive(Debug)]
struct Failure {
    status: Status,
    message: String,
    errno: c_int,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure {
            status: Status::of(&e),
            message: memshadow::error_chain(&e),
            errno: e.raw_os_error().unwrap_or(0),
        }
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure {
        status: Status::MEMSHADOW_ERR_INVALID_ARGUMENT,
        message: message.into(),
        errno: 0,
    }
}

thread_local! {
    /// This thread's last error message ("" after a success).
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
    /// The errno behind this thread's last failure (0 after a success, or if none).
    static LAST_ERRNO: Cell<c_int> = const { Cell::new(0) };
}

fn set_last_error(message: &str, errno: c_int) {
    // A message from the daemon could hold a NUL; C would cut it there anyway.
    let bytes: Vec<u8> = message.bytes().filter(|&b| b != 0).collect();
    let c = CString::new(bytes).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
    LAST_ERRNO.with(|l| l.set(errno));
}

/// Runs an entry point that cannot fail and leaves the last error alone (the getters of
/// the last error and the version): no unwinding out, `fallback` after a panic.
fn no_unwind<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// A length or count from the library (a `u64` on the wire) as a `size_t`: it describes
/// memory of this process, so it fits.
fn size(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Runs one entry point: no unwinding out, the last error set (or cleared), and the
/// result or `fallback` returned with its code.
fn guard_value<T>(fallback: T, f: impl FnOnce() -> Result<T, Failure>) -> (T, Status) {
    let outcome = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Failure {
            status: Status::MEMSHADOW_ERR_INTERNAL,
            message: format!("internal error in libmemshadow (panic: {what})"),
            errno: 0,
        })
    });
    match outcome {
        Ok(v) => {
            set_last_error("", 0);
            (v, Status::MEMSHADOW_OK)
        }
        Err(e) => {
            set_last_error(&e.message, e.errno);
            (fallback, e.status)
        }
    }
}

/// [`guard_value`] for entry points that return only a code.
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> Status {
    guard_value((), f).1
}

/// A client handle (`struct memshadow_client`): a session with memshadowd.
#[derive(Debug)]
pub struct FfiClient {
    client: Client,
    daemon_version: CString,
    /// Monitor events drained and not handed out yet.
    monitor_events: monitor::Pending,
}

/// A mirror handle (`struct memshadow_mirror`): an attached range.
#[derive(Debug)]
pub struct FfiMirror {
    mirror: Mirror,
}

/// A counters snapshot (`struct memshadow_stats`).
#[derive(Debug)]
pub struct FfiStats {
    entries: Vec<(CString, u64)>,
}

/// Borrows the object behind a handle.
///
/// # Safety
/// `p` is NULL or points to a live `T` that outlives `'a`.
unsafe fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| invalid(format!("{what} is NULL")))
}

/// Stores `v` through an out pointer (checked for NULL first by `out_ptr`).
///
/// # Safety
/// `out` is valid for a write of a `T`.
unsafe fn put<T>(out: *mut T, v: T) {
    // SAFETY: the caller's contract.
    unsafe { out.write(v) }
}

/// Checks an out pointer and clears what it points to, so the caller never sees garbage.
///
/// # Safety
/// `out` is NULL or valid for a write of a `*mut T`.
unsafe fn out_ptr<T>(out: *mut *mut T, what: &str) -> Result<*mut *mut T, Failure> {
    if out.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: not NULL, and the caller's contract.
    unsafe { put(out, std::ptr::null_mut()) };
    Ok(out)
}

fn new_client(client: Client) -> *mut FfiClient {
    let daemon_version =
        CString::new(client.daemon_version().replace('\0', "")).unwrap_or_default();
    Box::into_raw(Box::new(FfiClient {
        client,
        daemon_version,
        monitor_events: monitor::Pending::default(),
    }))
}

/// Connects to memshadowd and registers this process. The socket is `MEMSHADOW_SOCKET` if
/// set, else `/run/memshadow/memshadowd.sock` if it exists (for every user: members of its
/// group need no setting), else `$XDG_RUNTIME_DIR/memshadow/memshadowd.sock` (the rules of
/// the Rust library and `memshadowctl`). On success `*out` is a new client handle (free it
/// with `memshadow_client_free`); on failure `*out` is NULL. A socket that refuses this
/// user gives `MEMSHADOW_ERR_PERMISSION_DENIED` with errno `EACCES`, and a message saying
/// which group to join; no socket at the path, `MEMSHADOW_ERR_CONNECT` with `ENOENT`.
///
/// # Safety
/// `out` is NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_connect(out: *mut *mut FfiClient) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, "out") }?;
        let client = Client::connect()?;
        // SAFETY: checked by `out_ptr`.
        unsafe { put(out, new_client(client)) };
        Ok(())
    })
}

/// Connects to memshadowd listening at `path` (a NUL-terminated file name) and registers
/// this process. On success `*out` is a new client handle (free it with
/// `memshadow_client_free`); on failure `*out` is NULL.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_connect_to(
    path: *const c_char,
    out: *mut *mut FfiClient,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, "out") }?;
        // SAFETY: the caller's contract.
        let path = unsafe { socket_arg(path) }.ok_or_else(|| invalid("path is NULL"))?;
        let client = Client::connect_to(path)?;
        // SAFETY: checked by `out_ptr`.
        unsafe { put(out, new_client(client)) };
        Ok(())
    })
}

/// `memshadow_connect_with`: let the external engines this process grants its mirrors to
/// write its memory (`memshadow_engine_write`), where its own mappings are writable. The
/// library then hands the daemon `/proc/self/mem` opened for writing too. Since 0.2.
pub const MEMSHADOW_CONNECT_DEVICE_WRITES: u32 = 1;

/// Every flag `memshadow_connect_with` knows.
const CONNECT_FLAGS: u32 = MEMSHADOW_CONNECT_DEVICE_WRITES;

/// The socket a C caller named: NULL for the default rules of `memshadow_connect`.
///
/// # Safety
/// `socket` is NULL or a NUL-terminated string that outlives `'a`.
unsafe fn socket_arg<'a>(socket: *const c_char) -> Option<&'a Path> {
    if socket.is_null() {
        return None;
    }
    // SAFETY: not NULL, and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(socket) };
    Some(Path::new(std::ffi::OsStr::from_bytes(s.to_bytes())))
}

/// The Rust library's builder for a socket (NULL: the default rules) and connect flags.
fn client_builder(socket: Option<&Path>, flags: u32) -> Result<memshadow::Builder, Failure> {
    if flags & !CONNECT_FLAGS != 0 {
        return Err(invalid(format!(
            "flags {flags:#x} has unknown bits {:#x} (MEMSHADOW_CONNECT_DEVICE_WRITES is {:#x})",
            flags & !CONNECT_FLAGS,
            MEMSHADOW_CONNECT_DEVICE_WRITES
        )));
    }
    let b = match socket {
        Some(p) => Client::builder().socket(p),
        None => Client::builder(),
    };
    Ok(b.device_writes(flags & MEMSHADOW_CONNECT_DEVICE_WRITES != 0))
}

/// `memshadow_connect` (`path` NULL) or `memshadow_connect_to` (`path` a NUL-terminated
/// file name) with options: `flags` is 0 or `MEMSHADOW_CONNECT_DEVICE_WRITES`, which lets
/// the engines this process grants write its memory. Unknown flag bits are
/// `MEMSHADOW_ERR_INVALID_ARGUMENT`. The Rust library's `Client::builder()`. On success
/// `*out` is a new client handle (free it with `memshadow_client_free`); on failure `*out`
/// is NULL. Since 0.2.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_connect_with(
    path: *const c_char,
    flags: u32,
    out: *mut *mut FfiClient,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, "out") }?;
        // SAFETY: the caller's contract.
        let path = unsafe { socket_arg(path) };
        let client = client_builder(path, flags)?.connect()?;
        // SAFETY: checked by `out_ptr`.
        unsafe { put(out, new_client(client)) };
        Ok(())
    })
}

/// Frees a handle made with `Box::into_raw`; NULL is ignored. Never unwinds.
///
/// # Safety
/// `handle` is NULL or a handle from `Box::into_raw` not freed yet, and no other thread
/// uses it any more.
unsafe fn free_handle<T>(handle: *mut T) {
    guard(|| {
        if !handle.is_null() {
            // SAFETY: a handle from `Box::into_raw`, freed once (the caller's contract).
            drop(unsafe { Box::from_raw(handle) });
        }
        Ok(())
    });
}

/// Closes the session and frees the handle. Mirrors still attached keep the connection
/// open until they are freed too. NULL is ignored.
///
/// # Safety
/// `client` is NULL or a handle from `memshadow_connect*` not freed yet, and no other
/// thread uses it any more.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_client_free(client: *mut FfiClient) {
    // SAFETY: the caller's contract is `free_handle`'s.
    unsafe { free_handle(client) }
}

/// The protocol version of the session (0 if `client` is NULL).
///
/// # Safety
/// `client` is NULL or a live client handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_client_protocol_version(client: *const FfiClient) -> u16 {
    guard_value(0, || {
        // SAFETY: the caller's contract.
        Ok(unsafe { handle(client, "client") }?
            .client
            .protocol_version())
    })
    .0
}

/// The daemon's version string, valid as long as the client handle (NULL if `client`
/// is NULL).
///
/// # Safety
/// `client` is NULL or a live client handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_client_daemon_version(
    client: *const FfiClient,
) -> *const c_char {
    guard_value(std::ptr::null(), || {
        // SAFETY: the caller's contract.
        Ok(unsafe { handle(client, "client") }?.daemon_version.as_ptr())
    })
    .0
}

/// The daemon's page size in bytes: attached ranges must be aligned to it (0 if `client`
/// is NULL).
///
/// # Safety
/// `client` is NULL or a live client handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_client_page_size(client: *const FfiClient) -> usize {
    guard_value(0, || {
        // SAFETY: the caller's contract.
        Ok(unsafe { handle(client, "client") }?.client.page_size())
    })
    .0
}

/// Mirrors the `len` bytes at `ptr` of this process (page aligned, already mapped). The
/// daemon only reads the range, and follows it when it is unmapped, moved or discarded.
/// On success `*out` is a new mirror handle (free it with `memshadow_mirror_free`); on
/// failure `*out` is NULL.
///
/// # Safety
/// `client` is NULL or a live client handle; `out` is NULL or valid for writing a pointer.
/// `ptr` is only an address (never dereferenced here).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_attach(
    client: *const FfiClient,
    ptr: *const c_void,
    len: usize,
    out: *mut *mut FfiMirror,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, "out") }?;
        // SAFETY: the caller's contract.
        let client = unsafe { handle(client, "client") }?;
        if ptr.is_null() {
            return Err(invalid("ptr is NULL"));
        }
        let mirror = client.client.attach(ptr.cast(), len)?;
        let m = Box::into_raw(Box::new(FfiMirror { mirror }));
        // SAFETY: checked by `out_ptr`.
        unsafe { put(out, m) };
        Ok(())
    })
}

/// `memshadow_attach_with`: the daemon's default policy (its `--dirty-policy`), as
/// `memshadow_attach`.
pub const MEMSHADOW_POLICY_DEFAULT: u32 = 0;
/// `memshadow_attach_with`: written pages are collected only on `memshadow_mirror_sync`.
pub const MEMSHADOW_POLICY_MANUAL: u32 = 1;
/// `memshadow_attach_with`: each device read collects the pages it reads first.
pub const MEMSHADOW_POLICY_STRICT: u32 = 2;
/// `memshadow_attach_with`: the daemon collects written pages on a timer, every
/// `period_ms` milliseconds (at least 10, the daemon's minimum; at most about 4.6 h).
pub const MEMSHADOW_POLICY_PERIODIC: u32 = 3;
/// `memshadow_attach_with`: as `MEMSHADOW_POLICY_MANUAL`, but nothing is tracked until the
/// first sync, which invalidates the whole range (later syncs, what was written since the
/// one before): this process's first writes to the range cost it no write-protect fault.
pub const MEMSHADOW_POLICY_LAZY: u32 = 4;

/// The Rust policy of a C one: `None` for the daemon's default.
fn policy_of(policy: u32, period_ms: u64) -> Result<Option<memshadow::Policy>, Failure> {
    let no_period = |name: &str| {
        if period_ms == 0 {
            Ok(())
        } else {
            Err(invalid(format!(
                "period_ms is {period_ms}, but {name} has no period (pass 0)"
            )))
        }
    };
    match policy {
        MEMSHADOW_POLICY_DEFAULT => no_period("MEMSHADOW_POLICY_DEFAULT").map(|()| None),
        MEMSHADOW_POLICY_MANUAL => {
            no_period("MEMSHADOW_POLICY_MANUAL").map(|()| Some(memshadow::Policy::Manual))
        }
        MEMSHADOW_POLICY_STRICT => {
            no_period("MEMSHADOW_POLICY_STRICT").map(|()| Some(memshadow::Policy::Strict))
        }
        MEMSHADOW_POLICY_LAZY => {
            no_period("MEMSHADOW_POLICY_LAZY").map(|()| Some(memshadow::Policy::Lazy))
        }
        MEMSHADOW_POLICY_PERIODIC if period_ms == 0 => Err(invalid(
            "MEMSHADOW_POLICY_PERIODIC needs a period_ms (at least 10)",
        )),
        MEMSHADOW_POLICY_PERIODIC => Ok(Some(memshadow::Policy::Periodic(
            std::time::Duration::from_millis(period_ms),
        ))),
        p => Err(invalid(format!(
            "{p} is no policy (MEMSHADOW_POLICY_DEFAULT, _MANUAL, _LAZY, _STRICT or _PERIODIC)"
        ))),
    }
}

/// `memshadow_attach` with a collection policy for the pages this process writes in the
/// range: `MEMSHADOW_POLICY_DEFAULT` (the daemon's `--dirty-policy`, what
/// `memshadow_attach` uses), `MEMSHADOW_POLICY_MANUAL` (only on `memshadow_mirror_sync`),
/// `MEMSHADOW_POLICY_LAZY` (only on sync, tracked from the first), `MEMSHADOW_POLICY_STRICT`
/// (each device read collects the pages it reads first) or `MEMSHADOW_POLICY_PERIODIC` (the
/// daemon's timer, every `period_ms` ms, at least 10).
/// `period_ms` is 0 for every policy but `MEMSHADOW_POLICY_PERIODIC`; an unknown policy or a
/// period where none belongs is `MEMSHADOW_ERR_INVALID_ARGUMENT`. A policy other than
/// manual is refused with `MEMSHADOW_ERR_UNSUPPORTED` when the daemon has no dirty tracking
/// for this process. The Rust library's `Client::attach_with`. On success `*out` is a new
/// mirror handle (free it with `memshadow_mirror_free`); on failure `*out` is NULL.
///
/// # Safety
/// As `memshadow_attach`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_attach_with(
    client: *const FfiClient,
    ptr: *const c_void,
    len: usize,
    policy: u32,
    period_ms: u64,
    out: *mut *mut FfiMirror,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, "out") }?;
        // SAFETY: the caller's contract.
        let client = unsafe { handle(client, "client") }?;
        if ptr.is_null() {
            return Err(invalid("ptr is NULL"));
        }
        let mirror = match policy_of(policy, period_ms)? {
            None => client.client.attach(ptr.cast(), len)?,
            Some(p) => client.client.attach_with(ptr.cast(), len, p)?,
        };
        let m = Box::into_raw(Box::new(FfiMirror { mirror }));
        // SAFETY: checked by `out_ptr`.
        unsafe { put(out, m) };
        Ok(())
    })
}

/// Runs `f` on the mirror behind a handle.
///
/// # Safety
/// `mirror` is NULL or a live mirror handle.
unsafe fn on_mirror<T>(
    mirror: *const FfiMirror,
    f: impl FnOnce(&Mirror) -> Result<T, Error>,
) -> Result<T, Failure> {
    // SAFETY: the caller's contract.
    let m = unsafe { handle(mirror, "mirror") }?;
    Ok(f(&m.mirror)?)
}

/// A device read: copies `len` bytes at `offset` of the mirror into `buf`, served by the
/// daemon from its shadow (a read issued after `munmap`/`madvise` returned never sees the
/// old bytes). Fails with `MEMSHADOW_ERR_NOT_MIRRORED` where the range was unmapped and
/// `MEMSHADOW_ERR_BAD_RANGE` outside the mirror; `buf` may be partly written then.
///
/// # Safety
/// `mirror` is NULL or a live mirror handle; `buf` is NULL or valid for writing `len`
/// bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_mirror_read(
    mirror: *const FfiMirror,
    offset: usize,
    buf: *mut c_void,
    len: usize,
) -> Status {
    guard(|| {
        if buf.is_null() {
            return Err(invalid("buf is NULL"));
        }
        if len > isize::MAX as usize {
            return Err(invalid("len is too large"));
        }
        // SAFETY: not NULL, `len` fits an allocation, and valid for writes of `len`
        // bytes by the caller's contract; u8 needs no alignment.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        // SAFETY: the caller's contract.
        unsafe { on_mirror(mirror, |m| m.read(offset as u64, buf)) }
    })
}

/// Faults `offset..offset+len` of the mirror into the shadow without reading it. If
/// `pages_out` is not NULL it receives the number of pages the mirror then has in the
/// shadow.
///
/// # Safety
/// `mirror` is NULL or a live mirror handle; `pages_out` is NULL or valid for writing a
/// `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_mirror_populate(
    mirror: *const FfiMirror,
    offset: usize,
    len: usize,
    pages_out: *mut usize,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let pages = unsafe { on_mirror(mirror, |m| m.populate(offset as u64, len as u64)) }?;
        if !pages_out.is_null() {
            // SAFETY: not NULL, and the caller's contract.
            unsafe { put(pages_out, size(pages)) };
        }
        Ok(())
    })
}

/// What [`memshadow_mirror_sync`] did.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct memshadow_sync_report {
    /// Pages whose written state was looked at (0 for the `uffd-wp` back end).
    pub pages_scanned: usize,
    /// Pages found written and invalidated (re-mirrored on the next device access).
    pub pages_dirty: usize,
    /// Runs of written pages (one invalidation each).
    pub regions: usize,
    /// Time spent finding and re-arming the written pages, in ns.
    pub scan_ns: u64,
    /// Time spent invalidating them, in ns.
    pub invalidate_ns: u64,
}

/// Collects the pages of the mirror written since the last collection and invalidates
/// them, so device reads issued after this returns see every write made before it was
/// called. If `report_out` is not NULL it receives what was done.
/// `MEMSHADOW_ERR_UNSUPPORTED` if the daemon has no dirty tracking for this client.
///
/// # Safety
/// `mirror` is NULL or a live mirror handle; `report_out` is NULL or valid for writing a
/// `memshadow_sync_report`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_mirror_sync(
    mirror: *const FfiMirror,
    report_out: *mut memshadow_sync_report,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let r = unsafe { on_mirror(mirror, |m| m.sync()) }?;
        if !report_out.is_null() {
            let report = memshadow_sync_report {
                pages_scanned: size(r.pages_scanned),
                pages_dirty: size(r.pages_dirty),
                regions: size(r.regions),
                scan_ns: r.scan_ns,
                invalidate_ns: r.invalidate_ns,
            };
            // SAFETY: not NULL, and the caller's contract.
            unsafe { put(report_out, report) };
        }
        Ok(())
    })
}

/// A grant's token (since 0.2): the unguessable 128-bit number `memshadow_mirror_grant`
/// gives and `memshadow_engine_attach` takes, never 0. `bytes` holds it least significant
/// byte first (little-endian), as the Rust library's `u128` `to_le_bytes`. To pass it to
/// another process as text, use `memshadow_token_to_hex` and `memshadow_token_from_hex`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct memshadow_token {
    /// The token, little-endian.
    pub bytes: [u8; 16],
}

impl memshadow_token {
    fn of(token: u128) -> memshadow_token {
        memshadow_token {
            bytes: token.to_le_bytes(),
        }
    }

    fn value(&self) -> u128 {
        u128::from_le_bytes(self.bytes)
    }
}

/// Grants an external engine access to this mirror: `*token_out` receives a new
/// unguessable token (never 0) to hand to the engine by any means (a pipe, a file, the
/// command line as `memshadow_token_to_hex` writes it); the engine passes it to
/// `memshadow_engine_attach`. An engine of another user is refused (unless it is root or
/// the daemon's user). Detaching the mirror, or this process's exit, revokes every grant of
/// the mirror and evicts its engines. To let engines write this process's memory, connect
/// with `memshadow_connect_with(..., MEMSHADOW_CONNECT_DEVICE_WRITES, ...)`.
/// `MEMSHADOW_ERR_UNSUPPORTED` if the daemon has no external engines (protocol 3),
/// `MEMSHADOW_ERR_NO_SUCH_MIRROR` after a detach. On failure `*token_out` is all zeros.
/// The Rust library's `Mirror::grant`. Since 0.2.
///
/// # Safety
/// `mirror` is NULL or a live mirror handle; `token_out` is NULL or valid for writing a
/// `memshadow_token`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_mirror_grant(
    mirror: *const FfiMirror,
    token_out: *mut memshadow_token,
) -> Status {
    guard(|| {
        if token_out.is_null() {
            return Err(invalid("token_out is NULL"));
        }
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(token_out, memshadow_token::default()) };
        // SAFETY: the caller's contract.
        let token = unsafe { on_mirror(mirror, Mirror::grant) }?;
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(token_out, memshadow_token::of(token)) };
        Ok(())
    })
}

/// The size of the buffer `memshadow_token_to_hex` needs: 32 hex digits and a NUL.
pub const MEMSHADOW_TOKEN_HEX_SIZE: usize = 33;

/// Writes `*token` into `buf` as text: 32 lowercase hex digits, most significant first (the
/// token as one 128-bit number, as Rust's `format!("{token:032x}")`), and a NUL.
/// `size` is the size of `buf`, at least `MEMSHADOW_TOKEN_HEX_SIZE`; a smaller one is
/// `MEMSHADOW_ERR_INVALID_ARGUMENT` (and `buf`, if it has room for it, gets "").
/// Since 0.2.
///
/// # Safety
/// `token` is NULL or points to a `memshadow_token`; `buf` is NULL or valid for writing
/// `size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_token_to_hex(
    token: *const memshadow_token,
    buf: *mut c_char,
    size: usize,
) -> Status {
    guard(|| {
        if buf.is_null() {
            return Err(invalid("buf is NULL"));
        }
        if size == 0 {
            return Err(invalid("size is 0"));
        }
        // SAFETY: not NULL, `size` >= 1 bytes writable by the caller's contract.
        unsafe { put(buf, 0) };
        if size < MEMSHADOW_TOKEN_HEX_SIZE {
            return Err(invalid(format!(
                "size is {size}; a token needs {MEMSHADOW_TOKEN_HEX_SIZE} bytes \
                 (MEMSHADOW_TOKEN_HEX_SIZE)"
            )));
        }
        // SAFETY: the caller's contract.
        let token = unsafe { handle(token, "token") }?;
        let text = format!("{:032x}\0", token.value());
        debug_assert_eq!(text.len(), MEMSHADOW_TOKEN_HEX_SIZE);
        // SAFETY: `buf` is valid for `size` >= MEMSHADOW_TOKEN_HEX_SIZE = `text.len()` bytes
        // by the caller's contract, and a fresh `String` cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), text.len()) };
        Ok(())
    })
}

/// A token from text: 1 to 32 hex digits (either case), most significant first, and
/// nothing else (no `0x`, no spaces or newline), as `memshadow_token_to_hex` writes it or
/// Rust's `{:x}` formats a `u128`. Anything else is `MEMSHADOW_ERR_INVALID_ARGUMENT` and
/// leaves `*out` all zeros. All zeros (a token is never 0) is accepted here and refused by
/// `memshadow_engine_attach`. Since 0.2.
///
/// # Safety
/// `hex` is NULL or a NUL-terminated string; `out` is NULL or valid for writing a
/// `memshadow_token`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_token_from_hex(
    hex: *const c_char,
    out: *mut memshadow_token,
) -> Status {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(out, memshadow_token::default()) };
        if hex.is_null() {
            return Err(invalid("hex is NULL"));
        }
        // SAFETY: not NULL, and NUL-terminated by the caller's contract.
        let text = unsafe { CStr::from_ptr(hex) }.to_bytes();
        let token = parse_token(text).ok_or_else(|| {
            invalid(format!(
                "{:?} is no token: 1 to 32 hex digits expected",
                String::from_utf8_lossy(text)
            ))
        })?;
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(out, memshadow_token::of(token)) };
        Ok(())
    })
}

/// 1 to 32 hex digits as a `u128`.
fn parse_token(text: &[u8]) -> Option<u128> {
    if text.is_empty() || text.len() > 32 || !text.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(text).ok()?, 16).ok()
}

/// The mirror's id (0 if `mirror` is NULL).
///
/// # Safety
/// `mirror` is NULL or a live mirror handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_mirror_id(mirror: *const FfiMirror) -> u64 {
    // SAFETY: the caller's contract.
    guard_value(0, || unsafe { on_mirror(mirror, |m| Ok(m.id())) }).0
}

/// The mirror's length in bytes (0 if `mirror` is NULL).
///
/// # Safety
/// `mirror` is NULL or a live mirror handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_mirror_len(mirror: *const FfiMirror) -> usize {
    // SAFETY: the caller's contract.
    guard_value(0, || unsafe { on_mirror(mirror, |m| Ok(size(m.len()))) }).0
}

/// Stops mirroring and reports whether the daemon agreed. The handle stays valid (reads
/// then fail) until `memshadow_mirror_free`; detaching twice is a no-op.
///
/// # Safety
/// `mirror` is NULL or a live mirror handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_mirror_detach(mirror: *const FfiMirror) -> Status {
    // SAFETY: the caller's contract.
    guard(|| unsafe { on_mirror(mirror, Mirror::detach_shared) })
}

/// Frees a mirror handle, detaching it first if it still is attached (errors ignored:
/// use `memshadow_mirror_detach` to see them). NULL is ignored.
///
/// # Safety
/// `mirror` is NULL or a handle from `memshadow_attach` not freed yet, and no other thread
/// uses it any more.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_mirror_free(mirror: *mut FfiMirror) {
    // SAFETY: the caller's contract is `free_handle`'s.
    unsafe { free_handle(mirror) }
}

fn new_stats(entries: Vec<(String, u64)>) -> *mut FfiStats {
    let entries = entries
        .into_iter()
        .map(|(n, v)| (CString::new(n.replace('\0', "")).unwrap_or_default(), v))
        .collect();
    Box::into_raw(Box::new(FfiStats { entries }))
}

/// Takes a snapshot of this session's counters (`client.reads`, `client.faults`,
/// `client.invalidations`, `events.unmap`, ...). On success `*out` is a new stats handle
/// (free it with `memshadow_stats_free`); on failure `*out` is NULL.
///
/// # Safety
/// `client` is NULL or a live client handle; `out` is NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_client_stats(
    client: *const FfiClient,
    out: *mut *mut FfiStats,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, "out") }?;
        // SAFETY: the caller's contract.
        let entries = unsafe { handle(client, "client") }?.client.stats()?;
        // SAFETY: checked by `out_ptr`.
        unsafe { put(out, new_stats(entries)) };
        Ok(())
    })
}

/// Takes a snapshot of the daemon's counters (`shadow.slots_in_use`,
/// `device.flushes_issued`, ...), like `memshadow_client_stats`.
///
/// # Safety
/// `client` is NULL or a live client handle; `out` is NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_daemon_stats(
    client: *const FfiClient,
    out: *mut *mut FfiStats,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, "out") }?;
        // SAFETY: the caller's contract.
        let entries = unsafe { handle(client, "client") }?
            .client
            .control()
            .status()?
            .counters;
        // SAFETY: checked by `out_ptr`.
        unsafe { put(out, new_stats(entries)) };
        Ok(())
    })
}

/// The number of counters in a snapshot (0 if `stats` is NULL).
///
/// # Safety
/// `stats` is NULL or a live stats handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_stats_count(stats: *const FfiStats) -> usize {
    guard_value(0, || {
        // SAFETY: the caller's contract.
        Ok(unsafe { handle(stats, "stats") }?.entries.len())
    })
    .0
}

/// Counter number `index` (0 <= index < count) of a snapshot: `*name` gets its name
/// (valid as long as the stats handle) and `*value` its value. Either out pointer may be
/// NULL if not wanted. `MEMSHADOW_ERR_BAD_RANGE` if `index` is out of range.
///
/// # Safety
/// `stats` is NULL or a live stats handle; `name` and `value` are NULL or valid for a
/// write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_stats_entry(
    stats: *const FfiStats,
    index: usize,
    name: *mut *const c_char,
    value: *mut u64,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let stats = unsafe { handle(stats, "stats") }?;
        let (n, v) = stats.entries.get(index).ok_or_else(|| {
            Failure::from(Error::BadRange(format!(
                "counter {index} of {}",
                stats.entries.len()
            )))
        })?;
        if !name.is_null() {
            // SAFETY: not NULL, and the caller's contract.
            unsafe { put(name, n.as_ptr()) };
        }
        if !value.is_null() {
            // SAFETY: not NULL, and the caller's contract.
            unsafe { put(value, *v) };
        }
        Ok(())
    })
}

/// Looks up the counter called `name` in a snapshot and stores its value in `*value`.
/// `MEMSHADOW_ERR_INVALID_ARGUMENT` if there is no such counter.
///
/// # Safety
/// `stats` is NULL or a live stats handle; `name` is NULL or a NUL-terminated string;
/// `value` is NULL or valid for writing a `uint64_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_stats_get(
    stats: *const FfiStats,
    name: *const c_char,
    value: *mut u64,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let stats = unsafe { handle(stats, "stats") }?;
        if name.is_null() || value.is_null() {
            return Err(invalid("name or value is NULL"));
        }
        // SAFETY: not NULL, and NUL-terminated by the caller's contract.
        let name = unsafe { CStr::from_ptr(name) };
        let v = stats
            .entries
            .iter()
            .find(|(n, _)| n.as_c_str() == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| invalid(format!("no counter {}", name.to_string_lossy())))?;
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(value, v) };
        Ok(())
    })
}

/// Frees a stats snapshot. NULL is ignored.
///
/// # Safety
/// `stats` is NULL or a handle from `memshadow_*_stats` not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_stats_free(stats: *mut FfiStats) {
    // SAFETY: the caller's contract is `free_handle`'s.
    unsafe { free_handle(stats) }
}

/// An external engine handle (`struct memshadow_engine`, since 0.2): an engine of one
/// mirror of another process (the client), reading the client's mirrored memory straight
/// from the daemon's shadow, shared with it, at memory speed, through a TLB of its own, and
/// acknowledging the daemon's TLB flushes itself (docs/engines.md). The client grants the
/// mirror (`memshadow_mirror_grant`); the engine attaches with the token
/// (`memshadow_engine_attach`) on a session of its own; it need not be a client itself.
///
/// The contract the library keeps for an engine:
/// - G1: a `memshadow_engine_read` that begins after the client's `munmap`, `madvise` or
///   `mremap` of the range returned never sees the old bytes.
/// - G2: the engine acknowledges flushes only inside `memshadow_engine_poll` and
///   `memshadow_engine_read` (before it translates anything), so between its accesses,
///   never during a copy; the daemon reuses a shadow slot only after every engine
///   acknowledged the flush that unmapped it, so no slot is reused under a read.
/// - An engine must keep acknowledging: wait for `memshadow_engine_fd` to be readable
///   (poll, epoll) and call `memshadow_engine_poll`, or read. One that leaves a flush
///   unacknowledged longer than the daemon's `device.engine_ack_timeout_ms` (default
///   1000) is evicted: poll, read and write then fail with `MEMSHADOW_ERR_EVICTED`. Its
///   mappings stay, so a read that raced the eviction may have returned stale bytes, or
///   bytes of a slot reused for another page, of the same client only (never another
///   client's memory). An evicted engine can only be freed.
///
/// Threads: an engine handle is used by one thread at a time (every call on it, the
/// getters too); it may be handed to another thread between calls. Different engines may
/// be used by different threads at once.
#[derive(Debug)]
pub struct FfiEngine {
    engine: memshadow::Engine,
}

/// What an engine counted since it attached (`memshadow_engine_stats`, since 0.2).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct memshadow_engine_counters {
    /// Page translations found in the engine's TLB.
    pub tlb_hits: u64,
    /// Page translations not in the TLB (looked up in the shared page table).
    pub tlb_misses: u64,
    /// Fault requests sent to the daemon (one per missing run of pages of a read).
    pub faults: u64,
    /// Flush requests of the daemon handled and acknowledged (each an invalidation that
    /// touched this engine's mirror, or a "flush all").
    pub flushes_processed: u64,
    /// Times a read started again (after faults, or because the client's memory changed
    /// during the copy).
    pub retries: u64,
}

/// The pieces a device write is cut into: the protocol's largest message payload
/// (`memshadow_proto::MAX_READ`, checked by a test), what `Engine::write` takes per call.
const WRITE_CHUNK: usize = 60 * 1024;

/// Stores a new engine handle through `out` (checked by `out_ptr`).
///
/// # Safety
/// `out` is valid for writing a pointer.
unsafe fn put_engine(out: *mut *mut FfiEngine, engine: memshadow::Engine) {
    let e = Box::into_raw(Box::new(FfiEngine { engine }));
    // SAFETY: the caller's contract.
    unsafe { put(out, e) };
}

/// Attaches as an external engine to the mirror `*token` grants (`memshadow_mirror_grant`
/// in the client), on a session of its own with the daemon at `socket` (a NUL-terminated
/// path), or, with `socket` NULL, at the socket `memshadow_connect` would find. The
/// process need not be a client. On success `*out` is a new engine handle (free it with
/// `memshadow_engine_free`); on failure `*out` is NULL.
/// Errors: `MEMSHADOW_ERR_NO_SUCH_GRANT` when the token is wrong, revoked (its mirror was
/// detached or its client exited) or given to another user; `MEMSHADOW_ERR_INVALID_ARGUMENT`
/// for a token of 0; `MEMSHADOW_ERR_UNSUPPORTED` when the daemon has no external engines;
/// the connection errors of `memshadow_connect`. Since 0.2.
///
/// # Safety
/// `socket` is NULL or a NUL-terminated string; `token` is NULL or points to a
/// `memshadow_token`; `out` is NULL or valid for writing a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_attach(
    socket: *const c_char,
    token: *const memshadow_token,
    out: *mut *mut FfiEngine,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, "out") }?;
        // SAFETY: the caller's contract.
        let token = unsafe { handle(token, "token") }?.value();
        // SAFETY: the caller's contract.
        let socket = unsafe { socket_arg(socket) };
        let engine = memshadow::Engine::attach(socket, token)?;
        // SAFETY: checked by `out_ptr`.
        unsafe { put_engine(out, engine) };
        Ok(())
    })
}

/// Attaches as an external engine to mirror `mirror_id` (the client's
/// `memshadow_mirror_id`) of the client with process id `pid`, without a grant: only root
/// and the daemon's own user may (`MEMSHADOW_ERR_PERMISSION_DENIED` otherwise).
/// `MEMSHADOW_ERR_NO_SUCH_CLIENT` when no client has that pid (any pid <= 0),
/// `MEMSHADOW_ERR_NO_SUCH_MIRROR` when it has no such mirror. Otherwise as
/// `memshadow_engine_attach`. Since 0.2.
///
/// # Safety
/// `socket` is NULL or a NUL-terminated string; `out` is NULL or valid for writing a
/// pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_attach_pid(
    socket: *const c_char,
    pid: i32,
    mirror_id: u64,
    out: *mut *mut FfiEngine,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let out = unsafe { out_ptr(out, "out") }?;
        // SAFETY: the caller's contract.
        let socket = unsafe { socket_arg(socket) };
        let engine = memshadow::Engine::attach_pid(socket, pid, mirror_id)?;
        // SAFETY: checked by `out_ptr`.
        unsafe { put_engine(out, engine) };
        Ok(())
    })
}

/// Borrows the engine behind a handle, for a call that changes it.
///
/// # Safety
/// `engine` is NULL or a live engine handle that no other thread uses during `'a`.
unsafe fn engine_mut<'a>(engine: *mut FfiEngine) -> Result<&'a mut memshadow::Engine, Failure> {
    // SAFETY: the caller's contract.
    let e = unsafe { engine.as_mut() }.ok_or_else(|| invalid("engine is NULL"))?;
    Ok(&mut e.engine)
}

/// Runs `f` on the engine behind a handle, for a getter.
///
/// # Safety
/// `engine` is NULL or a live engine handle that no other thread uses meanwhile.
unsafe fn on_engine<T>(
    engine: *const FfiEngine,
    f: impl FnOnce(&memshadow::Engine) -> T,
) -> Result<T, Failure> {
    // SAFETY: the caller's contract.
    let e = unsafe { handle(engine, "engine") }?;
    Ok(f(&e.engine))
}

/// A read of the engine's mirror: copies `len` bytes at `offset` into `buf` from the
/// shared shadow. It first handles the flushes the daemon queued (as `memshadow_engine_poll`
/// does, without the doorbell's system call), then translates each page through the
/// engine's TLB, else the shared page table, asking the daemon to fault in missing pages
/// (one request per missing run), copies, and starts again if the client's memory changed
/// meanwhile. No system call when every page is in the shadow and nothing changed. G1: the
/// bytes are never older than a `munmap`, `madvise` or `mremap` of the client that returned
/// before the call began.
/// Errors: `MEMSHADOW_ERR_BAD_RANGE` outside the mirror, `MEMSHADOW_ERR_NOT_MIRRORED` where
/// the client unmapped the range, `MEMSHADOW_ERR_EVICTED`, `MEMSHADOW_ERR_DAEMON_GONE`,
/// `MEMSHADOW_ERR_PROTOCOL` when the daemon seems stuck; `buf` may be partly written then.
/// Not thread-safe: one thread at a time per engine. Since 0.2.
///
/// # Safety
/// `engine` is NULL or a live engine handle no other thread uses meanwhile; `buf` is NULL
/// or valid for writing `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_read(
    engine: *mut FfiEngine,
    offset: usize,
    buf: *mut c_void,
    len: usize,
) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        let engine = unsafe { engine_mut(engine) }?;
        if buf.is_null() {
            return Err(invalid("buf is NULL"));
        }
        if len > isize::MAX as usize {
            return Err(invalid("len is too large"));
        }
        // SAFETY: not NULL, `len` fits an allocation, and valid for writes of `len`
        // bytes by the caller's contract; u8 needs no alignment.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        Ok(engine.read(offset as u64, buf)?)
    })
}

/// A device (DMA) write: the daemon writes the `len` bytes at `buf` into the client's
/// memory at `offset` into the mirror, where the client's mappings are writable, then
/// invalidates the pages written, so this engine's next read, the other engines and the
/// client all see the new bytes. The client must have allowed it (it connected with
/// `MEMSHADOW_CONNECT_DEVICE_WRITES`). A long write goes in pieces of 60 KiB, each written
/// and invalidated in turn. If `written` is not NULL it receives the bytes written: fewer
/// than `len` where the client's mapping stops being writable part of the way, and on
/// failure those the pieces before the failing one wrote.
/// Errors: `MEMSHADOW_ERR_DAEMON` when nothing could be written at `offset` (the client did
/// not allow device writes, or its mapping there is read-only; the message says so),
/// `MEMSHADOW_ERR_BAD_RANGE` outside the mirror, `MEMSHADOW_ERR_NOT_MIRRORED`,
/// `MEMSHADOW_ERR_EVICTED`, `MEMSHADOW_ERR_DAEMON_GONE`. One thread at a time per engine.
/// Since 0.2.
///
/// # Safety
/// `engine` is NULL or a live engine handle no other thread uses meanwhile; `buf` is NULL
/// or valid for reading `len` bytes; `written` is NULL or valid for writing a `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_write(
    engine: *mut FfiEngine,
    offset: usize,
    buf: *const c_void,
    len: usize,
    written: *mut usize,
) -> Status {
    guard(|| {
        if !written.is_null() {
            // SAFETY: not NULL, and the caller's contract.
            unsafe { put(written, 0) };
        }
        // SAFETY: the caller's contract.
        let engine = unsafe { engine_mut(engine) }?;
        if buf.is_null() {
            return Err(invalid("buf is NULL"));
        }
        if len > isize::MAX as usize {
            return Err(invalid("len is too large"));
        }
        // SAFETY: not NULL, `len` fits an allocation, and valid for reads of `len` bytes
        // by the caller's contract; u8 needs no alignment.
        let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        let mut done = 0usize;
        let outcome = write_pieces(engine, offset, bytes, &mut done);
        if !written.is_null() {
            // SAFETY: not NULL, and the caller's contract.
            unsafe { put(written, done) };
        }
        outcome
    })
}

/// Writes `bytes` at `offset` in pieces of at most [`WRITE_CHUNK`], counting what was
/// written in `done`; stops after a short piece.
fn write_pieces(
    engine: &mut memshadow::Engine,
    offset: usize,
    bytes: &[u8],
    done: &mut usize,
) -> Result<(), Failure> {
    if bytes.is_empty() {
        // Still checked against the mirror, and the engine's state, by the library.
        engine.write(offset as u64, bytes)?;
        return Ok(());
    }
    for piece in bytes.chunks(WRITE_CHUNK) {
        let at = offset
            .checked_add(*done)
            .ok_or_else(|| Failure::from(Error::BadRange(format!("offset {offset:#x}"))))?;
        let n = engine.write(at as u64, piece)?;
        *done += n.min(piece.len());
        if n < piece.len() {
            break;
        }
    }
    Ok(())
}

/// Handles the flushes the daemon queued for this engine: drops the translations they name
/// and acknowledges them (waking the daemon, which may be waiting to reuse the slots), and
/// drains the doorbell. Call it whenever `memshadow_engine_fd` is readable, between
/// accesses; cheap when there is nothing to do (no system call but the doorbell's read).
/// `MEMSHADOW_ERR_EVICTED` once evicted. One thread at a time per engine. Since 0.2.
///
/// # Safety
/// `engine` is NULL or a live engine handle no other thread uses meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_poll(engine: *mut FfiEngine) -> Status {
    guard(|| {
        // SAFETY: the caller's contract.
        Ok(unsafe { engine_mut(engine) }?.poll()?)
    })
}

/// The engine's doorbell, a file descriptor (a pipe's read end) that becomes readable when the
/// daemon queued flushes for it: wait for `POLLIN`/`EPOLLIN` with poll or epoll, then call
/// `memshadow_engine_poll`. Do not read, write or close it; it stays valid until
/// `memshadow_engine_free`. -1 if `engine` is NULL. Since 0.2.
///
/// # Safety
/// `engine` is NULL or a live engine handle no other thread uses meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_fd(engine: *const FfiEngine) -> c_int {
    // SAFETY: the caller's contract.
    guard_value(-1, || unsafe { on_engine(engine, |e| e.fd().as_raw_fd()) }).0
}

/// Stores what the engine counted since it attached in `*out`. Since 0.2.
///
/// # Safety
/// `engine` is NULL or a live engine handle no other thread uses meanwhile; `out` is NULL
/// or valid for writing a `memshadow_engine_counters`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_stats(
    engine: *const FfiEngine,
    out: *mut memshadow_engine_counters,
) -> Status {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(out, memshadow_engine_counters::default()) };
        // SAFETY: the caller's contract.
        let s = unsafe { on_engine(engine, memshadow::Engine::stats) }?;
        let counters = memshadow_engine_counters {
            tlb_hits: s.tlb_hits,
            tlb_misses: s.tlb_misses,
            faults: s.faults,
            flushes_processed: s.flushes_processed,
            retries: s.retries,
        };
        // SAFETY: not NULL, and the caller's contract.
        unsafe { put(out, counters) };
        Ok(())
    })
}

/// The engine's id, unique in the daemon's run (0 if `engine` is NULL). Since 0.2.
///
/// # Safety
/// `engine` is NULL or a live engine handle no other thread uses meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_id(engine: *const FfiEngine) -> u64 {
    // SAFETY: the caller's contract.
    guard_value(0, || unsafe {
        on_engine(engine, |e| u64::from(e.engine_id()))
    })
    .0
}

/// The id of the engine's mirror within its client, the client's `memshadow_mirror_id`
/// (0 if `engine` is NULL). Since 0.2.
///
/// # Safety
/// `engine` is NULL or a live engine handle no other thread uses meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_mirror_id(engine: *const FfiEngine) -> u64 {
    // SAFETY: the caller's contract.
    guard_value(0, || unsafe {
        on_engine(engine, memshadow::Engine::mirror_id)
    })
    .0
}

/// The address of the mirror's first byte in the client's address space (not this
/// process's: offsets, not addresses, are what reads take), as it was when the engine
/// attached (0 if `engine` is NULL). Since 0.2.
///
/// # Safety
/// `engine` is NULL or a live engine handle no other thread uses meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_addr(engine: *const FfiEngine) -> u64 {
    // SAFETY: the caller's contract.
    guard_value(0, || unsafe { on_engine(engine, memshadow::Engine::addr) }).0
}

/// The mirror's length in bytes (0 if `engine` is NULL). Since 0.2.
///
/// # Safety
/// `engine` is NULL or a live engine handle no other thread uses meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_len(engine: *const FfiEngine) -> usize {
    // SAFETY: the caller's contract.
    guard_value(0, || unsafe { on_engine(engine, |e| size(e.len())) }).0
}

/// The daemon's page size in bytes (0 if `engine` is NULL). Since 0.2.
///
/// # Safety
/// `engine` is NULL or a live engine handle no other thread uses meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_page_size(engine: *const FfiEngine) -> usize {
    // SAFETY: the caller's contract.
    guard_value(0, || unsafe { on_engine(engine, |e| size(e.page_size())) }).0
}

/// Detaches the engine and frees the handle: closes its session (the daemon then counts it
/// as having acknowledged everything, so nothing waits for it) and unmaps the shadow. The
/// doorbell fd is closed. Never fails. NULL is ignored. The Rust library's
/// `Engine::detach`. Since 0.2.
///
/// # Safety
/// `engine` is NULL or a handle from `memshadow_engine_attach*` not freed yet, and no other
/// thread uses it any more.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memshadow_engine_free(engine: *mut FfiEngine) {
    // SAFETY: the caller's contract is `free_handle`'s.
    unsafe { free_handle(engine) }
}

/// The message of the last failed call on this thread ("" if the last call succeeded).
/// Never NULL. Valid until the next `memshadow_*` call on this thread (other than
/// `memshadow_last_error`, `memshadow_last_errno`, `memshadow_status_name` and
/// `memshadow_version`).
#[unsafe(no_mangle)]
pub extern "C" fn memshadow_last_error() -> *const c_char {
    no_unwind(c"".as_ptr(), || {
        LAST_ERROR
            .try_with(|l| l.borrow().as_ptr())
            .unwrap_or(c"".as_ptr())
    })
}

/// The errno behind the last failed call on this thread: the error number of the system
/// call that failed in this process (`ENOENT` or `ECONNREFUSED` with
/// `MEMSHADOW_ERR_CONNECT`, `EPERM` with `MEMSHADOW_ERR_UFFD`, `EACCES` with
/// `MEMSHADOW_ERR_NOT_DUMPABLE`, ...). 0 if no system call failed behind it (a refusal of
/// the daemon, a bad argument) or the last call succeeded. Set and cleared with
/// `memshadow_last_error`.
#[unsafe(no_mangle)]
pub extern "C" fn memshadow_last_errno() -> c_int {
    no_unwind(0, || LAST_ERRNO.try_with(Cell::get).unwrap_or(0))
}

/// The name of a result code (e.g. "MEMSHADOW_ERR_BAD_RANGE"), a static string; NULL for
/// a value that is no code.
#[unsafe(no_mangle)]
pub extern "C" fn memshadow_status_name(status: i32) -> *const c_char {
    no_unwind(std::ptr::null(), || {
        Status::ALL
            .iter()
            .find(|s| **s as i32 == status)
            .map_or(std::ptr::null(), |s| s.name().as_ptr())
    })
}

/// The version of the libmemshadow loaded at run time, "MAJOR.MINOR.PATCH" (e.g. "0.1.0"),
/// a static string. `MEMSHADOW_VERSION_MAJOR`, `_MINOR` and `_PATCH` are the version of
/// the header a program was built with. The dynamic linker sees to the major version (the
/// SONAME, `libmemshadow.so.MAJOR`); a program that calls a function added in minor
/// version y needs a library of version MAJOR.y or later.
#[unsafe(no_mangle)]
pub extern "C" fn memshadow_version() -> *const c_char {
    const V: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"?",
        };
    no_unwind(c"?".as_ptr(), || V.as_ptr())
}

mod monitor;

#[cfg(test)]
mod tests;
