//! Descriptors the library knows by number inside a program that may close descriptors it
//! did not open and get the same numbers back for files of its own. Each is remembered with
//! the (device, inode) it had: the library uses, closes or writes to a number only while it
//! still names that file.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

/// A descriptor number and the file it named when it was [`Held::set`].
#[derive(Debug)]
pub struct Held {
    fd: AtomicI32,
    dev: AtomicU64,
    ino: AtomicU64,
}

impl Held {
    /// Nothing held.
    pub const fn none() -> Held {
        Held {
            fd: AtomicI32::new(-1),
            dev: AtomicU64::new(0),
            ino: AtomicU64::new(0),
        }
    }

    /// Remembers `fd` and the file it names now; false (and nothing held) if it is not open.
    pub fn set(&self, fd: RawFd) -> bool {
        let Some((dev, ino)) = identity(fd) else {
            self.fd.store(-1, Ordering::Relaxed);
            return false;
        };
        self.dev.store(dev, Ordering::Relaxed);
        self.ino.store(ino, Ordering::Relaxed);
        self.fd.store(fd, Ordering::Release);
        true
    }

    /// The number, if it still names the file it named when it was set.
    pub fn get(&self) -> Option<RawFd> {
        let fd = self.fd.load(Ordering::Acquire);
        let want = (
            self.dev.load(Ordering::Relaxed),
            self.ino.load(Ordering::Relaxed),
        );
        (fd >= 0 && identity(fd) == Some(want)).then_some(fd)
    }

    /// Closes it if it still names its file, and forgets it. Only `fstat` and `close`:
    /// safe in a `fork` child handler.
    pub fn close_if_ours(&self) {
        if let Some(fd) = self.get() {
            // SAFETY: closes this process's copy of a descriptor the library opened and
            // that still names the same file; nothing of the library uses it afterwards.
            unsafe { libc::close(fd) };
        }
        self.fd.store(-1, Ordering::Relaxed);
    }
}

/// (device, inode) of an open descriptor.
fn identity(fd: RawFd) -> Option<(u64, u64)> {
    if fd < 0 {
        return None;
    }
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a struct stat into the buffer we pass; fd is only read.
    let r = unsafe { libc::fstat(fd, st.as_mut_ptr()) };
    // SAFETY: fstat succeeded, so it filled st.
    (r == 0)
        .then(|| unsafe { st.assume_init() })
        .map(|st| (st.st_dev, st.st_ino))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_number_reused_for_another_file_is_not_ours() {
        let dir = std::env::temp_dir();
        let a = std::fs::File::create(dir.join(format!("held-a-{}", std::process::id())))
            .expect("create a");
        let held = Held::none();
        assert!(held.set(a.as_raw_fd()));
        assert_eq!(held.get(), Some(a.as_raw_fd()));
        let n = a.as_raw_fd();
        drop(a);
        assert_eq!(held.get(), None, "closed");
        let b = std::fs::File::create(dir.join(format!("held-b-{}", std::process::id())))
            .expect("create b");
        assert_eq!(b.as_raw_fd(), n, "the number comes back");
        assert_eq!(held.get(), None, "another file behind the same number");
        held.close_if_ours();
        assert!(
            identity(b.as_raw_fd()).is_some(),
            "the program's file stays open"
        );
        let _ = std::fs::remove_file(dir.join(format!("held-a-{}", std::process::id())));
        let _ = std::fs::remove_file(dir.join(format!("held-b-{}", std::process::id())));
    }
}
