//! A doorbell the daemon rings and another process waits on (an external engine's ring, a
//! client's monitor queue): a pipe. The daemon keeps the write end, non-blocking, and hands
//! out only the read end, which the other process polls (`poll`, `epoll`) and drains.
//!
//! Why not an eventfd: an eventfd is one open file, shared by every duplicate of it. Its
//! holder may clear `O_NONBLOCK` on it and fill its counter, and the daemon's next ring
//! would then block for good, on the event reader every client waits for. A pipe's two ends
//! are two open files: the reader can change only its own, and cannot write at all. The
//! pipe is one page: a reader that never drains it fills it, and rings then find it full
//! and change nothing (it is readable already).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// Bytes the pipe holds (the smallest size the kernel gives: one page).
const CAPACITY: libc::c_int = 4096;

/// A doorbell: the read end to hand out, the write end the daemon rings.
#[derive(Debug)]
pub struct Doorbell {
    read: OwnedFd,
    write: OwnedFd,
}

impl Doorbell {
    /// A new, silent doorbell.
    pub fn new() -> std::io::Result<Doorbell> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // Best effort: a smaller pipe only bounds the memory a reader that never drains
        // makes the kernel keep.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(CAPACITY));
        Ok(Doorbell { read, write })
    }

    /// Rings: one byte into the pipe. Never blocks (the write end is the daemon's alone,
    /// and non-blocking); a full pipe is already rung, and a reader gone changes nothing.
    pub fn ring(&self) {
        let _ = nix::unistd::write(&self.write, &[1]);
    }

    /// The end to hand out.
    pub fn reader(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Drains what was rung (tests).
    #[cfg(test)]
    pub fn drain(&self) -> usize {
        let mut buf = [0u8; 512];
        let mut n = 0;
        while let Ok(k @ 1..) = nix::unistd::read(&self.read, &mut buf) {
            n += k;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The other process may make its end blocking and never drain it: ringing still never
    /// blocks, and the doorbell stays readable.
    #[test]
    fn a_reader_that_never_drains_cannot_make_a_ring_block() {
        let d = Doorbell::new().expect("doorbell");
        let theirs = d.reader().try_clone_to_owned().expect("dup");
        fcntl(&theirs, FcntlArg::F_SETFL(OFlag::empty())).expect("clear O_NONBLOCK");
        assert!(
            nix::unistd::write(&theirs, &[1]).is_err(),
            "the read end cannot be written"
        );
        for _ in 0..1_000_000 {
            d.ring();
        }
        // The read end is one open file with `theirs`: non-blocking again, to drain here.
        fcntl(&theirs, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("set O_NONBLOCK");
        let rung = d.drain();
        assert!(rung > 0 && rung <= 1 << 16, "{rung}");
        d.ring();
        assert_eq!(d.drain(), 1);
    }
}
