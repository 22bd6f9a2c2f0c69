//! Small safe wrappers over the system calls the daemon makes that `std` does not cover.
//!
//! System calls the daemon needs beyond `std` go through here, so the rest of the daemon
//! calls safe functions with typed results and stays free of `unsafe`, except where it
//! touches shadow memory (`device::shadow`).

pub mod doorbell;
pub mod maps;
pub mod pagemap;
pub mod procfd;
pub mod rlimit;
pub mod socket;
pub mod uffd;

use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::time::TimeSpec;
use nix::sys::uio::{preadv, process_vm_readv, RemoteIoVec};
use nix::time::{clock_gettime, clock_nanosleep, ClockId, ClockNanosleepFlags};
use nix::unistd::Pid;

/// Page size the daemon works in. Checked against the kernel's at start-up.
pub const PAGE_SIZE: usize = 4096;

/// Largest iovec array one `process_vm_readv`/`preadv` call takes (`IOV_MAX` on Linux).
pub const IOV_MAX: usize = 1024;

/// The kernel's page size.
pub fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or(PAGE_SIZE)
}

/// Creates an anonymous memory file of `len` bytes (close-on-exec), sparse until written.
pub fn memfd(name: &str, len: u64) -> nix::Result<File> {
    let fd: OwnedFd = memfd_create(name, MFdFlags::MFD_CLOEXEC)?;
    let file = File::from(fd);
    file.set_len(len)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    Ok(file)
}

/// Opens the file behind `fd` again, read-only (through `/proc/self/fd`): a new open file
/// description whose mappings cannot be made writable.
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let f = std::fs::OpenOptions::new().read(true).open(path)?;
    Ok(OwnedFd::from(f))
}

/// Sleeps while the low 32 bits of `word` (in memory shared with another process) equal
/// `expected`, at most `timeout`, or until a [`futex_wake_shared`] on it. Spurious wake-ups
/// and interruptions just return; the caller re-checks.
pub fn futex_wait_shared(word: &AtomicU64, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `word` is a live, aligned AtomicU64 whose low half (little-endian, checked in
    // engine_abi) is the futex word; FUTEX_WAIT only reads it; `ts` outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr().cast::<u32>(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every waiter on `word` ([`futex_wait_shared`]), in any process.
pub fn futex_wake_shared(word: &AtomicU64) {
    // SAFETY: `word` is a live, aligned AtomicU64; FUTEX_WAKE does not access its memory
    // beyond using the address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr().cast::<u32>(),
            libc::FUTEX_WAKE,
            i32::MAX,
        );
    }
}

/// [`memfd`], sealed against changing size (and further seals), for memory shared with
/// other processes: a mapping of it can never fault past a shrunk end (`SIGBUS`). Its mode
/// is 0400: a process given a read-only fd of it cannot open it again for writing through
/// `/proc/self/fd` (a memfd is created 0777).
pub fn memfd_sealed(name: &str, len: u64) -> nix::Result<File> {
    let fd: OwnedFd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::S_IRUSR)?;
    let file = File::from(fd);
    file.set_len(len)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let seals = nix::fcntl::SealFlag::F_SEAL_SHRINK
        | nix::fcntl::SealFlag::F_SEAL_GROW
        | nix::fcntl::SealFlag::F_SEAL_SEAL;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_ADD_SEALS(seals))?;
    Ok(file)
}

/// Releases the pages of `offset..offset+len` of a memory file (the file keeps its size), so
/// the memory really goes back to the system.
pub fn punch_hole(file: &impl AsFd, offset: u64, len: u64) -> nix::Result<()> {
    let off = i64::try_from(offset).map_err(|_| Errno::EOVERFLOW)?;
    let len = i64::try_from(len).map_err(|_| Errno::EOVERFLOW)?;
    fallocate(
        file.as_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}

/// Lowers the calling thread's timer slack to 1 ns, so that timed sleeps wake when asked
/// rather than up to 50 µs later (the default slack).
pub fn lower_timer_slack() -> nix::Result<()> {
    nix::sys::prctl::set_timerslack(1)
}

/// `CLOCK_MONOTONIC` now.
pub fn monotonic_now() -> TimeSpec {
    // CLOCK_MONOTONIC cannot fail on Linux; fall back to zero rather than panic.
    clock_gettime(ClockId::CLOCK_MONOTONIC).unwrap_or_else(|_| TimeSpec::new(0, 0))
}

/// Typical lateness of a timed wake-up on this machine (ns), learnt from every
/// [`sleep_until`]: even with a 1 ns timer slack, a virtual machine's timer fires tens of µs
/// late (≈30 µs median for 100 µs sleeps on the dev VMs).
static WAKE_LATENESS_NS: AtomicI64 = AtomicI64::new(20_000);

/// Most a [`sleep_until`] spins after an early wake-up.
const MAX_SPIN_NS: i64 = 50_000;

/// Sleeps until the absolute `CLOCK_MONOTONIC` time `deadline` (restarting after signals),
/// precisely but without burning a core: it asks the kernel to wake it early by the typical
/// wake-up lateness it has observed, then spins for what is left (usually a few µs, at most
/// 50 µs). Call [`lower_timer_slack`] on the thread first.
pub fn sleep_until(deadline: &TimeSpec) {
    let early = WAKE_LATENESS_NS.load(Relaxed).clamp(0, MAX_SPIN_NS);
    let target = ns_timespec(timespec_ns(deadline) - early);
    if monotonic_now() < target {
        sleep_until_coarse(&target);
        let late = timespec_ns(&monotonic_now()) - timespec_ns(&target);
        // Exponential moving average with weight 1/8.
        let avg = WAKE_LATENESS_NS.load(Relaxed);
        WAKE_LATENESS_NS.store(avg + (late.clamp(0, 1_000_000) - avg) / 8, Relaxed);
    }
    while monotonic_now() < *deadline {
        std::hint::spin_loop();
    }
}

/// Sleeps until `deadline` without the early wake-up and spin of [`sleep_until`]: for
/// threads whose wake-up time nobody waits on (several of them spinning on a 2-core machine
/// would steal the CPU from the one that matters).
pub fn sleep_until_coarse(deadline: &TimeSpec) {
    loop {
        match clock_nanosleep(
            ClockId::CLOCK_MONOTONIC,
            ClockNanosleepFlags::TIMER_ABSTIME,
            deadline,
        ) {
            Err(Errno::EINTR) => continue,
            _ => return,
        }
    }
}

/// A `CLOCK_MONOTONIC` time as nanoseconds.
pub fn timespec_ns(t: &TimeSpec) -> i64 {
    t.tv_sec() * 1_000_000_000 + t.tv_nsec()
}

/// Nanoseconds as a `CLOCK_MONOTONIC` time.
pub fn ns_timespec(ns: i64) -> TimeSpec {
    TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

/// Copies `len(local)` bytes of process `pid`'s memory starting at `remote_addr` into
/// `local`, in calls of at most [`IOV_MAX`] iovecs. Returns the bytes copied: fewer than
/// asked if the remote range stops being mapped part-way.
pub fn read_remote(pid: i32, remote_addr: u64, local: &mut [IoSliceMut<'_>]) -> nix::Result<usize> {
    let mut done = 0usize;
    let mut addr = remote_addr;
    for chunk in local.chunks_mut(IOV_MAX) {
        let want: usize = chunk.iter().map(|s| s.len()).sum();
        let base = usize::try_from(addr).map_err(|_| Errno::EFAULT)?;
        let remote = [RemoteIoVec { base, len: want }];
        let got = match process_vm_readv(Pid::from_raw(pid), chunk, &remote) {
            Ok(n) => n,
            Err(Errno::EFAULT | Errno::ENOMEM) if done > 0 => 0,
            Err(e) => return Err(e),
        };
        done += got;
        if got < want {
            break;
        }
        addr += want as u64;
    }
    Ok(done)
}

/// Like [`read_remote`], through an open `/proc/PID/mem` file (`preadv` at the address).
/// `ESRCH` if the address space the file was opened on is gone ([`procfd::mem_alive`]).
///
/// `/proc/PID/mem` has no vectored read: the kernel calls it once per iovec, each call
/// pinning the mm and walking to the page again. So iovecs that are adjacent in our memory
/// (runs of adjacent shadow slots) are merged into one buffer first.
pub fn read_mem_file(
    mem: &impl AsFd,
    remote_addr: u64,
    local: &mut [IoSliceMut<'_>],
) -> nix::Result<usize> {
    let mut merged: Vec<IoSliceMut<'_>> = Vec::with_capacity(local.len());
    let mut run: Option<(*mut u8, usize)> = None;
    for s in local.iter_mut() {
        let (p, l) = (s.as_mut_ptr(), s.len());
        run = match run {
            Some((start, len)) if start.wrapping_add(len) == p => Some((start, len + l)),
            Some((start, len)) => {
                merged.push(io_slice(start, len));
                Some((p, l))
            }
            None => Some((p, l)),
        };
    }
    if let Some((start, len)) = run {
        merged.push(io_slice(start, len));
    }
    let mut done = 0usize;
    let mut addr = remote_addr;
    for chunk in merged.chunks_mut(IOV_MAX) {
        let want: usize = chunk.iter().map(|s| s.len()).sum();
        let off = i64::try_from(addr).map_err(|_| Errno::EFAULT)?;
        let got = loop {
            match preadv(mem.as_fd(), chunk, off) {
                Err(Errno::EINTR) => continue,
                Err(Errno::EIO | Errno::EFAULT) if done > 0 => return Ok(done),
                // Nothing at all, not even EIO: the file's address space is gone
                // (procfd::mem_alive).
                Ok(0) if want > 0 => return Err(Errno::ESRCH),
                other => break other?,
            }
        };
        done += got;
        if got < want {
            break;
        }
        addr += want as u64;
    }
    Ok(done)
}

/// Re-forms one buffer out of adjacent ones.
fn io_slice<'a>(start: *mut u8, len: usize) -> IoSliceMut<'a> {
    // SAFETY: `start..start+len` is the concatenation of adjacent, disjoint `IoSliceMut`
    // buffers that the caller's `local` slice borrows mutably for `'a`; they are not used
    // through `local` while the merged slices live (both are confined to `read_mem_file`).
    IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(start, len) })
}

/// What an fd refers to, as `readlink /proc/self/fd/N` says (e.g. `/proc/1234/mem` or
/// `anon_inode:[userfaultfd]`).
pub fn fd_target(fd: BorrowedFd<'_>) -> std::io::Result<String> {
    let p = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(p.to_string_lossy().into_owned())
}

/// Opens a pidfd for `pid` (Linux 5.3+), which pins the identity of the process: it stays
/// about that process even if the pid is reused after it exits.
pub fn pidfd_open(pid: i32) -> nix::Result<OwnedFd> {
    // SAFETY: plain system call with integer arguments; a non-negative result is a new fd
    // that nothing else owns.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    let fd = i32::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// True while the process behind `pidfd` has not exited (a pidfd becomes readable at exit).
pub fn pidfd_alive(pidfd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => true,
        Ok(_) => false,
        // Cannot tell: treat as gone, the safe answer for reading its memory.
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_tracks_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let pidfd = pidfd_open(child.id() as i32).expect("pidfd_open");
        assert!(pidfd_alive(pidfd.as_fd()));
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(!pidfd_alive(pidfd.as_fd()));
        let f = File::open("/proc/self/mem").expect("open");
        assert_eq!(
            fd_target(f.as_fd()).expect("readlink"),
            format!("/proc/{}/mem", std::process::id())
        );
    }

    #[test]
    fn page_size_matches() {
        assert_eq!(page_size(), PAGE_SIZE, "memshadow assumes 4 KiB pages");
    }

    #[test]
    fn absolute_sleep_wakes_after_the_deadline() {
        lower_timer_slack().expect("timerslack");
        let now = monotonic_now();
        let deadline = now + TimeSpec::from_duration(std::time::Duration::from_micros(200));
        sleep_until(&deadline);
        assert!(monotonic_now() >= deadline);
    }

    #[test]
    fn remote_and_mem_file_reads_copy_our_own_memory() {
        let src: Vec<u8> = (0..3 * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; 2 * PAGE_SIZE];
        let addr = src.as_ptr() as u64;
        {
            let mut iov = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
            let n = read_remote(std::process::id() as i32, addr, &mut iov)
                .expect("process_vm_readv self");
            assert_eq!(n, 3 * PAGE_SIZE);
        }
        assert_eq!(&a[..], &src[..PAGE_SIZE]);
        assert_eq!(&b[..], &src[PAGE_SIZE..]);
        let mem = File::open("/proc/self/mem").expect("open /proc/self/mem");
        let mut c = vec![0u8; 3 * PAGE_SIZE];
        let n = read_mem_file(&mem, addr, &mut [IoSliceMut::new(&mut c)]).expect("preadv mem");
        assert_eq!(n, 3 * PAGE_SIZE);
        assert_eq!(c, src);
    }

    #[test]
    fn punching_a_hole_zeroes_and_keeps_the_size() {
        use std::os::unix::fs::FileExt;
        let f = memfd("test", 4 * PAGE_SIZE as u64).expect("memfd");
        f.write_all_at(&[7u8; PAGE_SIZE], PAGE_SIZE as u64)
            .expect("write");
        punch_hole(&f, PAGE_SIZE as u64, PAGE_SIZE as u64).expect("punch");
        let mut buf = [1u8; PAGE_SIZE];
        f.read_exact_at(&mut buf, PAGE_SIZE as u64).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(f.metadata().expect("stat").len(), 4 * PAGE_SIZE as u64);
    }
}
