//! The program's session with memshadowd, as the preload library keeps it: opened once by
//! the constructor, used by the wrappers to attach what the program maps, given up for good
//! at the first sign the daemon is gone. Nothing here may change what the program sees:
//! every failure leaves the program running, unmirrored where it must be, with one line
//! on its stderr at most ([`say`]).
//!
//! Invariants:
//! * The thresholds ([`MAP_MIN`], [`MALLOC_MIN`]) are `usize::MAX` whenever there is no
//!   usable session (before the constructor, after a failure, in a forked child): the
//!   wrappers' fast path is one load and one compare.
//! * The library detaches only what the program unmapped. What the program unmaps, moves or
//!   discards the daemon learns from the kernel (userfaultfd events) and retires by itself;
//!   a mirror retired whole keeps its id (and its place in the client's mirror quota) until
//!   the client detaches it, so the library detaches mirrors the daemon lists as `gone`
//!   ([`Session::reap`]): every [`REAP_EVERY`] attaches, and before it retries an attach the
//!   quota refused. Every other handle stays in [`Session::mirrors`], never dropped.
//! * Before each request the session's socket is checked to be the one it connected (a
//!   program may close file descriptors it does not know of, and reuse the number).

use std::collections::HashMap;
use std::ffi::c_void;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use memshadow::run::{RunPolicy, ENV_QUIET, PRELOAD_FILE};
use memshadow::{Client, Error, Mirror, MirrorInfo};

use crate::fds::Held;

/// `mmap`/`mremap` results at least this long are looked at (`usize::MAX`: none).
pub static MAP_MIN: AtomicUsize = AtomicUsize::new(usize::MAX);
/// `malloc`-family requests at least this long are looked at (`usize::MAX`: none).
pub static MALLOC_MIN: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The heap's growth is followed.
pub static HEAP_ON: AtomicBool = AtomicBool::new(false);

/// The session's socket (checked before each request, closed in a forked child).
static SOCK: Held = Held::none();
/// The grant file (closed in a forked child).
static GRANT: Held = Held::none();
/// The program's stderr when the library started: its one line goes there only while fd 2
/// is still that file.
static STDERR: Held = Held::none();
/// The process that opened the session: a child made by a raw `clone` (no fork handlers)
/// must not speak on it.
static OPENED_BY: AtomicU32 = AtomicU32::new(0);
/// The one line this process may write has been written (or must not be).
static SAID: AtomicBool = AtomicBool::new(false);

static SESSION: OnceLock<Session> = OnceLock::new();

/// The bits of `mmap`'s flags that say private or shared.
const MAP_TYPE: i32 = 0x0f;

/// Attaches between two looks for mirrors the program unmapped.
const REAP_EVERY: u32 = 32;

struct Session {
    client: Client,
    policy: RunPolicy,
    page: usize,
    grants: Option<Mutex<std::fs::File>>,
    /// The end of the heap already attached (page aligned).
    heap_end: AtomicUsize,
    /// The heap is being looked at.
    heap_lock: Mutex<()>,
    /// Every mirror attached and not known gone, by id.
    mirrors: Mutex<HashMap<u64, Mirror>>,
    /// Attaches since the last [`Session::reap`].
    since_reap: AtomicU32,
}

/// The constructor's work: reads the policy, connects, and turns the wrappers on. Nothing
/// in a process the dynamic linker runs in secure mode (setuid, setgid, capabilities):
/// its environment is not its user's to trust.
pub fn start() {
    // SAFETY: getauxval reads the process's auxiliary vector; AT_SECURE is a valid type.
    if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
        return;
    }
    // A panic is caught (hooks.rs); the default hook would print it on the program's stderr.
    std::panic::set_hook(Box::new(|_| {}));
    STDERR.set(2);
    let policy = match RunPolicy::from_env() {
        Ok(p) => p,
        Err(e) => return say(&format!("not mirrored: {e}")),
    };
    if policy.quiet {
        SAID.store(true, Ordering::Relaxed);
    }
    if !policy.follow_exec {
        leave_ld_preload();
    }
    match Session::open(policy) {
        Ok(s) => {
            let s = SESSION.get_or_init(|| s);
            s.turn_on();
        }
        Err(e) => {
            say(&format!("not mirrored: {}", memshadow::error_chain(&e)));
            // The programs this one execs would fail the same way: they say nothing more.
            // (The constructor runs on the program's one thread, before its main.)
            std::env::set_var(ENV_QUIET, "1");
        }
    }
}

impl Session {
    fn open(policy: RunPolicy) -> Result<Session, Error> {
        let client = Client::builder()
            .socket(memshadow::socket_path()?)
            .timeout(ANSWER_LIMIT)
            .own_daemon_only(true)
            .connect()?;
        let page = client.page_size();
        if !page.is_power_of_two() || page > 1 << 30 {
            return Err(Error::Protocol(format!("a page size of {page} bytes")));
        }
        if !SOCK.set(client.session_fd()) {
            return Err(Error::DaemonGone);
        }
        OPENED_BY.store(std::process::id(), Ordering::Relaxed);
        let grants = match &policy.grant_file {
            Some(path) => Some(Mutex::new(open_grant_file(path)?)),
            None => None,
        };
        // SAFETY: sbrk(0) only reads the current break.
        let brk = unsafe { libc::sbrk(0) } as usize;
        Ok(Session {
            client,
            page,
            grants,
            heap_end: AtomicUsize::new(brk.next_multiple_of(page)),
            heap_lock: Mutex::new(()),
            mirrors: Mutex::new(HashMap::new()),
            since_reap: AtomicU32::new(0),
            policy,
        })
    }

    fn turn_on(&self) {
        let k = self.policy.kinds;
        if k.private || k.shared {
            MAP_MIN.store(self.policy.min_size, Ordering::Relaxed);
        }
        if k.malloc && crate::real::malloc_is_glibcs() {
            MALLOC_MIN.store(self.policy.min_size, Ordering::Relaxed);
        }
        HEAP_ON.store(k.heap, Ordering::Relaxed);
        // SAFETY: registers a function of this library to run in fork()'s child.
        unsafe { libc::pthread_atfork(None, None, Some(in_forked_child)) };
    }

    /// Attaches `[start, start+len)`; a refusal is said once, a lost daemon ends it all.
    fn attach(&self, start: usize, len: usize) {
        if !self.socket_is_ours() {
            if OPENED_BY.load(Ordering::Relaxed) == std::process::id() {
                stop("the program closed memshadow's connection; it runs on unmirrored");
            }
            return;
        }
        if self.since_reap.fetch_add(1, Ordering::Relaxed) >= REAP_EVERY {
            self.reap();
        }
        let ptr = start as *const u8;
        let result = match self.client.attach_with(ptr, len, self.policy.dirty) {
            Err(Error::QuotaExceeded(_)) if self.reap() > 0 => {
                self.client.attach_with(ptr, len, self.policy.dirty)
            }
            r => r,
        };
        match result {
            Ok(m) => self.keep(m),
            Err(e) => self.refused(&e),
        }
    }

    /// Detaches the mirrors the daemon lists as gone (their ranges were unmapped); returns
    /// how many.
    fn reap(&self) -> usize {
        self.since_reap.store(0, Ordering::Relaxed);
        match self.client.list_mirrors() {
            Ok(list) => self.reap_listed(&list),
            Err(e) => {
                self.refused(&e);
                0
            }
        }
    }

    fn reap_listed(&self, list: &[MirrorInfo]) -> usize {
        let gone: Vec<Mirror> = {
            let mut mine = self.mirrors.lock().unwrap_or_else(PoisonError::into_inner);
            list.iter()
                .filter(|m| is_gone(m))
                .filter_map(|m| mine.remove(&m.id))
                .collect()
        };
        let n = gone.len();
        for m in gone {
            if let Err(e) = m.detach() {
                self.refused(&e);
            }
        }
        n
    }

    fn keep(&self, m: Mirror) {
        if let Some(g) = &self.grants {
            if let Ok(token) = m.grant() {
                let line = format!(
                    "token={token:032x} pid={} mirror={} addr={:#x} len={}\n",
                    std::process::id(),
                    m.id(),
                    m.addr(),
                    m.len()
                );
                let mut f = g.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = f.write_all(line.as_bytes());
            }
        }
        self.mirrors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(m.id(), m);
    }

    fn refused(&self, e: &Error) {
        match e {
            Error::DaemonGone | Error::Socket(_) | Error::Protocol(_) => {
                stop("memshadowd went away or stopped answering; the program runs on unmirrored")
            }
            // A range the program unmapped (or changed) before the attach arrived.
            Error::BadRange(_) | Error::NotMirrored(_) => {}
            e => say(&format!(
                "a range was not mirrored ({}); later ranges are still tried",
                memshadow::error_chain(e)
            )),
        }
    }

    /// Attaches what of `[start, start+len)` no mirror of this session covers now, if one
    /// does (a mirror the daemon moved with an `mremap`), or all of it if `fresh`.
    fn cover(&self, start: usize, len: usize, fresh: bool) {
        if !self.socket_is_ours() {
            return;
        }
        let mirrors = match self.client.list_mirrors() {
            Ok(m) => m,
            Err(e) => return self.refused(&e),
        };
        self.reap_listed(&mirrors);
        let end = start.saturating_add(len);
        let mut covered: Vec<(usize, usize)> = mirrors
            .iter()
            .filter(|m| covers_whole(m))
            .map(|m| (m.addr as usize, m.addr.saturating_add(m.len) as usize))
            .filter(|&(a, b)| a < end && b > start)
            .collect();
        if covered.is_empty() && !fresh {
            return;
        }
        covered.sort_unstable();
        let mut at = start;
        for (a, b) in covered {
            if a > at {
                self.attach(at, a - at);
            }
            at = at.max(b);
        }
        if at < end {
            self.attach(at, end - at);
        }
    }

    /// The session may be used from here: its socket is still the one it connected, and
    /// this is the process that connected it.
    fn socket_is_ours(&self) -> bool {
        if OPENED_BY.load(Ordering::Relaxed) != std::process::id() {
            turn_off();
            return false;
        }
        SOCK.get().is_some()
    }
}

/// The daemon lists `m` as gone: its range was unmapped whole (`gone`, then maybe its
/// policy).
fn is_gone(m: &MirrorInfo) -> bool {
    m.state.split(", ").next() == Some("gone")
}

/// `m` still mirrors all of its range (not `gone`, no part unmapped or moved away).
fn covers_whole(m: &MirrorInfo) -> bool {
    let mut words = m.state.split(", ");
    words.next() == Some("active") && words.all(|w| w != "shrunk" && w != "holes")
}

/// An `mmap` the program made returned `addr` (`len` ≥ [`MAP_MIN`]).
pub fn mapped(addr: *mut c_void, len: usize, prot: i32, flags: i32) {
    let Some(s) = SESSION.get() else { return };
    let k = s.policy.kinds;
    let anon = flags & libc::MAP_ANONYMOUS != 0;
    let stack = flags & (libc::MAP_STACK | libc::MAP_GROWSDOWN) != 0;
    let shared = matches!(
        flags & MAP_TYPE,
        libc::MAP_SHARED | libc::MAP_SHARED_VALIDATE
    );
    let wanted = if shared { k.shared } else { k.private };
    if anon && !stack && wanted && prot & libc::PROT_READ != 0 {
        s.attach(addr as usize, len.next_multiple_of(s.page));
    }
}

/// An `mremap` moved or resized `[old, old+old_len)` to `[new, new+new_len)`.
pub fn remapped(new: *mut c_void, new_len: usize) {
    if let Some(s) = SESSION.get() {
        s.cover(new as usize, new_len.next_multiple_of(s.page), false);
    }
}

/// A `malloc`-family call returned the live block `p` of at least [`MALLOC_MIN`] bytes;
/// `grown`: it came from `realloc` (its mapping may be one the daemon already follows).
///
/// # Safety
/// `p` is a live block of glibc's allocator.
pub unsafe fn allocated(p: *mut c_void, grown: bool) {
    let Some(s) = SESSION.get() else { return };
    // SAFETY: the caller's promise.
    let Some((start, len)) = (unsafe { crate::chunk::mapping_of(p, s.page) }) else {
        return;
    };
    if grown {
        s.cover(start, len, true);
    } else {
        s.attach(start, len);
    }
}

/// Attaches what the heap grew by since it was last looked at, once that is at least the
/// minimum size (a shrink was an unmap: the daemon retired it, and growth from the new end
/// is attached again).
pub fn heap_grew() {
    let Some(s) = SESSION.get() else { return };
    let _one = s.heap_lock.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((end, brk)) = s.heap_change() {
        if brk > end {
            s.attach(end, brk - end);
        }
        s.heap_end.store(brk, Ordering::Relaxed);
    }
}

/// True when the heap shrank, or grew by the minimum size, since it was last looked at
/// (cheap: no system call, no lock).
pub fn heap_moved() -> bool {
    SESSION.get().is_some_and(|s| s.heap_change().is_some())
}

impl Session {
    /// The end of the heap attached and the break now (rounded up to a page), when the
    /// heap shrank or grew by the minimum size since: `sbrk(0)` reads the break without a
    /// system call.
    fn heap_change(&self) -> Option<(usize, usize)> {
        // SAFETY: sbrk(0) only reads the current break.
        let brk = (unsafe { libc::sbrk(0) } as usize).next_multiple_of(self.page);
        let end = self.heap_end.load(Ordering::Relaxed);
        (brk < end || brk >= end.saturating_add(self.policy.min_size)).then_some((end, brk))
    }
}

/// Writes one line on the program's stderr, the first time only (never with `quiet`).
pub fn say(msg: &str) {
    if SAID.swap(true, Ordering::Relaxed) {
        return;
    }
    let Some(fd) = STDERR.get() else {
        return; // fd 2 is not the stderr the program started with: say nothing.
    };
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
    let line = format!(
        "memshadow-run: {}[{}]: {msg}\n",
        comm.trim(),
        std::process::id()
    );
    // SAFETY: write(2) of a buffer we own to the program's stderr; a short or failed write
    // is ignored.
    let _ = unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
}

/// Turns every wrapper off for good, saying why once.
fn stop(why: &str) {
    turn_off();
    say(why);
}

/// Turns every wrapper off for good, silently.
pub fn turn_off() {
    MAP_MIN.store(usize::MAX, Ordering::Relaxed);
    MALLOC_MIN.store(usize::MAX, Ordering::Relaxed);
    HEAP_ON.store(false, Ordering::Relaxed);
}

/// In `fork()`'s child: the session belongs to the parent. The child's mappings are not
/// watched (the kernel does not carry the registrations over, or the daemon drops them),
/// so the library turns off and closes its copies of the parent's descriptors, saying
/// nothing to the daemon (the parent's session goes on).
extern "C" fn in_forked_child() {
    turn_off();
    SOCK.close_if_ours();
    GRANT.close_if_ours();
}

/// Opens the grant file for appending: created 0600 if missing. Tokens are secrets, and
/// opening a path can itself act (a FIFO blocks, a device or a terminal does something):
/// an existing path must be a regular file (looked at without following a link), it is
/// opened without following a link, without blocking and without becoming the controlling
/// terminal, and what was opened must be a regular file of this user, with one link and no
/// access for others.
fn open_grant_file(path: &std::path::Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::MetadataExt;
    let bad = |why: String| Error::InvalidArgument(format!("grant file {}: {why}", path.display()));
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            return Err(bad("exists and is not a regular file".into()))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad(e.to_string())),
    }
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    let meta = f.metadata().map_err(|e| bad(e.to_string()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.uid() != me || meta.mode() & 0o077 != 0 || meta.nlink() != 1 {
        return Err(bad(format!(
            "must belong to uid {me}, have mode 0600 and one link (it has uid {}, mode {:o}, \
             {} links)",
            meta.uid(),
            meta.mode() & 0o7777,
            meta.nlink()
        )));
    }
    GRANT.set(f.as_raw_fd());
    Ok(f)
}

/// How long the library waits for one answer (or to send one request) before it gives
/// the daemon up: longer than anything the daemon may legitimately take (an attach waits
/// up to 2 s for a change of the program's mappings to be applied), short enough that a
/// stopped or hostile daemon cannot hold the program's thread for good. A request that
/// times out turns the library off ([`Session::refused`]).
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// Takes this library out of `LD_PRELOAD`, so programs the process `exec`s run without it.
fn leave_ld_preload() {
    let Ok(v) = std::env::var("LD_PRELOAD") else {
        return;
    };
    let rest: Vec<&str> = v
        .split([':', ' '])
        .filter(|p| !p.is_empty() && !p.ends_with(PRELOAD_FILE))
        .collect();
    // SAFETY (not unsafe in this edition, but the rule it relies on): the constructor runs
    // before the program's main, on its one thread; nothing reads the environment at once.
    if rest.is_empty() {
        std::env::remove_var("LD_PRELOAD");
    } else {
        std::env::set_var("LD_PRELOAD", rest.join(":"));
    }
}
