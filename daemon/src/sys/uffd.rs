//! A client's userfaultfd, as the daemon drives it (docs/design.md §6, §7).
//!
//! The client creates the uffd in its own mm and hands it over without calling
//! `UFFDIO_API`; the daemon does the handshake here (the `userfaultfd` crate only does it
//! while creating a uffd, and lacks `WP_ASYNC` and friends), then registers ranges,
//! write-protects and reads events through the crate.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use userfaultfd::{Event, EventBuffer, RegisterMode};

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;

/// `UFFD_FEATURE_*` bits (include/uapi/linux/userfaultfd.h), several newer than the C
/// library headers of these machines.
pub mod features {
    /// Write-protect faults are reported with `UFFD_PAGEFAULT_FLAG_WP`.
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    /// Fork events (needs `CAP_SYS_PTRACE` in the caller of `UFFDIO_API`).
    pub const EVENT_FORK: u64 = 1 << 1;
    /// `mremap` events.
    pub const EVENT_REMAP: u64 = 1 << 2;
    /// `madvise(MADV_DONTNEED/REMOVE)` events.
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// `munmap` events.
    pub const EVENT_UNMAP: u64 = 1 << 6;
    /// Write-protect marks on unpopulated ptes.
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    /// Asynchronous write-protect (no faults; pages reported written via `PAGEMAP_SCAN`).
    pub const WP_ASYNC: u64 = 1 << 15;
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    /// Requested API (`UFFD_API`).
    pub api: u64,
    /// Requested features in, supported features out.
    pub features: u64,
    /// Supported ioctls out.
    pub ioctls: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);

nix::ioctl_readwrite!(uffdio_api_ioctl, 0xAA, 0x3F, UffdioApi);
// The number must match the kernel's _IOWR(0xAA, 0x3F, struct uffdio_api).
const _: () = assert!(nix::request_code_readwrite!(0xAA, 0x3F, 24) == 0xc018_aa3f);

/// Errors of userfaultfd operations.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The fd handed over is not a userfaultfd.
    #[error("fd is not a userfaultfd ({0})")]
    NotUffd(String),
    /// `fcntl` failed.
    #[error("fcntl on the userfaultfd failed")]
    Fcntl(#[source] nix::Error),
    /// `UFFDIO_API` failed.
    #[error("UFFDIO_API failed")]
    Api(#[source] nix::Error),
    /// Another uffd already watches (part of) the range (`EBUSY`).
    #[error("range {addr:#x}+{len:#x} is already watched by another userfaultfd")]
    Busy {
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The range is not (entirely) mapped, or not of a kind uffd supports.
    #[error("range {addr:#x}+{len:#x} is not mapped, or not registrable")]
    Invalid {
        /// First byte.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Any other failure of an ioctl or read.
    #[error("userfaultfd {op} failed")]
    Op {
        /// Which operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: userfaultfd::Error,
    },
}

impl UffdError {
    /// The kernel's error number behind this error, if any (e.g. `EAGAIN` from a
    /// write-protect ioctl while events are unread).
    pub fn errno(&self) -> Option<nix::Error> {
        match self {
            UffdError::Fcntl(e) | UffdError::Api(e) => Some(*e),
            UffdError::Op { source, .. } => errno_of(source),
            UffdError::Busy { .. } => Some(nix::Error::EBUSY),
            UffdError::NotUffd(_) | UffdError::Invalid { .. } => None,
        }
    }
}

/// `UFFD_USER_MODE_ONLY`: a uffd that handles user-mode faults only (allowed unprivileged).
pub const USER_MODE_ONLY: libc::c_int = 1;

/// An event of a client's uffd, with plain addresses.
#[derive(Debug)]
pub enum UffdEvent {
    /// `munmap` of `start..end` (also the source of an `mremap`, and `mmap` over it).
    Unmap {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `madvise(DONTNEED/REMOVE/FREE)` of `start..end`, before the pages are zapped.
    Remove {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `mremap` of `len` bytes from `from` to `to`; the registration moved with the VMA.
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Length.
        len: u64,
    },
    /// The client forked; this is the child's uffd.
    Fork {
        /// The child's uffd.
        child: OwnedFd,
    },
    /// A write to a write-protected page (synchronous WP tracking).
    WriteFault {
        /// The faulting address.
        addr: u64,
    },
    /// A missing-page or minor fault (never requested; reported, not expected).
    OtherFault {
        /// The faulting address.
        addr: u64,
    },
}

/// A client's uffd as the pieces of the daemon that use it share it; `None` once the client
/// was released (taking it out closes it, which is what releases blocked client threads).
pub type SharedUffd = std::sync::Arc<std::sync::Mutex<Option<Uffd>>>;

/// A client's userfaultfd, owned by the daemon.
pub struct Uffd {
    inner: userfaultfd::Uffd,
}

impl std::fmt::Debug for Uffd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uffd")
            .field("fd", &self.inner.as_raw_fd())
            .finish()
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

fn op(op: &'static str) -> impl FnOnce(userfaultfd::Error) -> UffdError {
    move |source| UffdError::Op { op, source }
}

fn errno_of(e: &userfaultfd::Error) -> Option<nix::Error> {
    match e {
        // The crate speaks an older nix; go through the raw number.
        userfaultfd::Error::SystemError(errno) => Some(nix::Error::from_raw(*errno as i32)),
        _ => None,
    }
}

impl Uffd {
    /// Takes ownership of a handed-over fd after checking that it is a userfaultfd.
    pub fn from_fd(fd: OwnedFd) -> Result<Uffd, UffdError> {
        let target = super::fd_target(fd.as_fd()).unwrap_or_else(|e| format!("unreadable: {e}"));
        if target != "anon_inode:[userfaultfd]" {
            return Err(UffdError::NotUffd(target));
        }
        let raw = fd.into_raw_fd();
        // SAFETY: `raw` came out of an `OwnedFd` just now, so it is an open fd that nothing
        // else owns; `userfaultfd::Uffd` takes over closing it.
        let inner = unsafe { userfaultfd::Uffd::from_raw_fd(raw) };
        Ok(Uffd { inner })
    }

    /// Creates a userfaultfd in this process (the start-up probes try features on scratch
    /// mappings of the daemon's own): a full one, or with `UFFD_USER_MODE_ONLY` if the
    /// daemon may not create a full one. Returns it and whether it is user-mode-only.
    pub fn create() -> Result<(Uffd, bool), UffdError> {
        let make = |extra: libc::c_int| -> Result<OwnedFd, nix::Error> {
            // SAFETY: a plain system call with integer flags; on success it returns a new fd.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_userfaultfd,
                    libc::O_CLOEXEC | libc::O_NONBLOCK | extra,
                )
            };
            if fd < 0 {
                return Err(nix::Error::last());
            }
            let fd = i32::try_from(fd).map_err(|_| nix::Error::EBADF)?;
            // SAFETY: the kernel just returned this fd to us; nothing else owns it.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let (fd, user_only) = match make(0) {
            Ok(fd) => (fd, false),
            Err(nix::Error::EPERM) => (make(USER_MODE_ONLY).map_err(UffdError::Api)?, true),
            Err(e) => return Err(UffdError::Api(e)),
        };
        Ok((Uffd::from_fd(fd)?, user_only))
    }

    /// Makes reads non-blocking (the client may have created it blocking).
    pub fn set_nonblocking(&self) -> Result<(), UffdError> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let fl = fcntl(self.as_fd(), FcntlArg::F_GETFL).map_err(UffdError::Fcntl)?;
        let fl = OFlag::from_bits_retain(fl) | OFlag::O_NONBLOCK;
        fcntl(self.as_fd(), FcntlArg::F_SETFL(fl)).map_err(UffdError::Fcntl)?;
        Ok(())
    }

    /// The `UFFDIO_API` handshake with `features` (the ones this kernel lacks are refused by
    /// the kernel with `EINVAL`); returns the features the kernel reports.
    pub fn api(&self, features: u64) -> Result<u64, UffdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: the fd is a userfaultfd (checked in from_fd) and `api` is a valid, writable
        // `struct uffdio_api` for the duration of the call.
        unsafe { uffdio_api_ioctl(self.inner.as_raw_fd(), &mut api) }.map_err(UffdError::Api)?;
        Ok(api.features)
    }

    /// Registers `addr..addr+len` in write-protect mode (which is enough to receive unmap,
    /// remove and remap events for it).
    pub fn register_wp(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.inner
            .register_with_mode(
                addr as *mut libc::c_void,
                len as usize,
                RegisterMode::WRITE_PROTECT,
            )
            .map(|_| ())
            .map_err(|e| match errno_of(&e) {
                Some(nix::Error::EBUSY) => UffdError::Busy { addr, len },
                Some(nix::Error::EINVAL | nix::Error::ENOMEM | nix::Error::EFAULT) => {
                    UffdError::Invalid { addr, len }
                }
                _ => op("register")(e),
            })
    }

    /// Unregisters `addr..addr+len`.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.inner
            .unregister(addr as *mut libc::c_void, len as usize)
            .map_err(op("unregister"))
    }

    /// Write-protects `addr..addr+len` (fails with `EAGAIN` while events are unread).
    pub fn write_protect(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.inner
            .write_protect(addr as *mut libc::c_void, len as usize)
            .map_err(op("write-protect"))
    }

    /// Removes write protection from `addr..addr+len`, waking faulting threads if `wake`.
    pub fn unprotect(&self, addr: u64, len: u64, wake: bool) -> Result<(), UffdError> {
        self.inner
            .remove_write_protection(addr as *mut libc::c_void, len as usize, wake)
            .map_err(op("unprotect"))
    }

    /// Wakes the threads waiting in a fault on `addr..addr+len` (after an un-protect done
    /// without waking them).
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        self.inner
            .wake(addr as *mut libc::c_void, len as usize)
            .map_err(op("wake"))
    }

    /// True while an unmap, remove, remap or fork event of this uffd is being delivered or
    /// not yet read (the kernel's `mmap_changing`): the address space may already differ
    /// from what the events read so far say. Probed with an un-protect ioctl of an empty
    /// range at `addr`, which changes nothing: `-EAGAIN` is checked before the range, which
    /// is then refused (`EINVAL`). (A non-empty range would un-protect pages that dirty
    /// tracking armed, if it overlapped a mirror.)
    pub fn events_pending(&self, addr: u64, _len: u64) -> bool {
        let page_aligned = addr & !(super::PAGE_SIZE as u64 - 1);
        match self
            .inner
            .remove_write_protection(page_aligned as *mut libc::c_void, 0, false)
        {
            Err(e) => errno_of(&e) == Some(nix::Error::EAGAIN),
            Ok(_) => false,
        }
    }

    /// Waits until no thread of the client holds its mmap lock for reading, by taking it for
    /// writing (`UFFDIO_UNREGISTER` takes it before it looks at the range, and then refuses
    /// the empty page 0 with `EINVAL`; nothing changes). A zap the client started under the
    /// read lock (`MADV_DONTNEED`) is over when this returns. Blocks while the client holds
    /// the lock: call it off shared threads.
    pub fn barrier(&self) {
        let _ = self
            .inner
            .unregister(std::ptr::null_mut(), super::PAGE_SIZE);
    }

    /// Reads the pending events (the fd is non-blocking), appending them to `out`. Returns
    /// how many were read; 0 if none were pending.
    pub fn read_events(
        &self,
        buf: &mut EventBuffer,
        out: &mut Vec<UffdEvent>,
    ) -> Result<usize, UffdError> {
        let before = out.len();
        for ev in self.inner.read_events(buf).map_err(op("read"))? {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!(error = %e, "unrecognised userfaultfd event skipped");
                    continue;
                }
            };
            out.push(match ev {
                Event::Unmap { start, end } => UffdEvent::Unmap {
                    start: start as u64,
                    end: end as u64,
                },
                Event::Remove { start, end } => UffdEvent::Remove {
                    start: start as u64,
                    end: end as u64,
                },
                Event::Remap { from, to, len } => UffdEvent::Remap {
                    from: from as u64,
                    to: to as u64,
                    len: len as u64,
                },
                Event::Fork { uffd } => {
                    // userfaultfd 0.9's `Uffd::into_raw_fd` returns the number but still
                    // closes it when the `Uffd` drops (a double close later): take the
                    // number and forget the `Uffd` instead.
                    let raw = uffd.as_raw_fd();
                    std::mem::forget(uffd);
                    UffdEvent::Fork {
                        // SAFETY: the kernel created this fd for the fork event; the `Uffd`
                        // forgotten above was its only owner.
                        child: unsafe { OwnedFd::from_raw_fd(raw) },
                    }
                }
                Event::Pagefault { kind, addr, .. } => match kind {
                    userfaultfd::FaultKind::WriteProtected => {
                        UffdEvent::WriteFault { addr: addr as u64 }
                    }
                    _ => UffdEvent::OtherFault { addr: addr as u64 },
                },
            });
        }
        Ok(out.len() - before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Creates a uffd the way the client library does (raw syscall, no API call).
    fn raw_uffd() -> OwnedFd {
        // SAFETY: plain system call; on success the result is a new fd we own.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
        // SAFETY: the syscall returned a fresh fd.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    #[test]
    fn handshake_register_and_remove_event() {
        crate::test_support::needs_full_userfaultfd!();
        let u = Uffd::from_fd(raw_uffd()).expect("a uffd");
        let f = u
            .api(features::EVENT_UNMAP | features::EVENT_REMOVE | features::EVENT_REMAP)
            .expect("api");
        assert_ne!(f & features::EVENT_REMOVE, 0);
        let mut map = memmap2::MmapMut::map_anon(4 * 4096).expect("mmap");
        map.fill(1);
        let addr = map.as_ptr() as u64;
        u.register_wp(addr, 4 * 4096).expect("register");
        // madvise blocks until the event is read: do it on another thread.
        let t = std::thread::spawn(move || {
            // SAFETY: the range is our own mapping.
            let r = unsafe { libc::madvise(addr as *mut libc::c_void, 4096, libc::MADV_DONTNEED) };
            assert_eq!(r, 0);
            map
        });
        let mut buf = EventBuffer::new(8);
        let mut events = Vec::new();
        while events.is_empty() {
            u.read_events(&mut buf, &mut events).expect("read");
            std::thread::yield_now();
        }
        assert!(
            matches!(events[0], UffdEvent::Remove { start, end } if start == addr && end == addr + 4096)
        );
        let map = t.join().expect("madvise thread");
        assert!(
            matches!(u.register_wp(addr, 4096), Ok(())),
            "re-register by the same uffd is fine"
        );
        u.unregister(addr, 4 * 4096).expect("unregister");
        drop(map);
    }

    /// The events-pending probe sees an unread event, and un-protects nothing.
    #[test]
    fn events_pending_sees_unread_events_and_changes_no_protection() {
        crate::test_support::needs_full_userfaultfd!();
        let u = Uffd::from_fd(raw_uffd()).expect("a uffd");
        u.api(features::EVENT_REMOVE | features::WP_ASYNC)
            .expect("api");
        let mut map = memmap2::MmapMut::map_anon(4 * 4096).expect("mmap");
        map.fill(1);
        let addr = map.as_ptr() as u64;
        u.register_wp(addr, 4 * 4096).expect("register");
        u.write_protect(addr, 4 * 4096).expect("arm");
        let pm = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
        let armed = |pm: &std::fs::File| {
            crate::sys::pagemap::read_words(pm, addr, 4)
                .expect("pagemap")
                .iter()
                .all(|w| w & crate::sys::pagemap::word::UFFD_WP != 0)
        };
        assert!(armed(&pm));
        assert!(!u.events_pending(addr, 4 * 4096));
        assert!(armed(&pm), "the probe left the protection alone");
        // madvise blocks until its event is read: do it on another thread.
        let t = std::thread::spawn(move || {
            // SAFETY: the range is our own mapping.
            let r = unsafe {
                libc::madvise(
                    (addr + 3 * 4096) as *mut libc::c_void,
                    4096,
                    libc::MADV_DONTNEED,
                )
            };
            assert_eq!(r, 0);
            map
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !u.events_pending(addr, 4 * 4096) {
            assert!(
                std::time::Instant::now() < deadline,
                "the event never showed"
            );
            std::thread::yield_now();
        }
        let mut buf = EventBuffer::new(8);
        let mut events = Vec::new();
        while events.is_empty() {
            u.read_events(&mut buf, &mut events).expect("read");
        }
        let map = t.join().expect("madvise thread");
        let words = crate::sys::pagemap::read_words(&pm, addr, 3).expect("pagemap");
        assert!(
            words
                .iter()
                .all(|w| w & crate::sys::pagemap::word::UFFD_WP != 0),
            "pages the event did not touch stay armed"
        );
        u.unregister(addr, 4 * 4096).expect("unregister");
        drop(map);
    }

    #[test]
    fn a_non_uffd_fd_is_refused() {
        let f = std::fs::File::open("/dev/null").expect("open");
        assert!(
            matches!(Uffd::from_fd(OwnedFd::from(f)), Err(UffdError::NotUffd(t)) if t == "/dev/null")
        );
    }
}
