//! Checks of the `/proc/self/...` files a client hands over (its `mem`, `pagemap` and
//! `clear_refs`), and whether the address space behind its `mem` file still exists.
//!
//! These fds are the daemon's only way into a client's memory (docs/threat-model.md): the
//! kernel checked, when the *client* opened them, that it may read that address space, and
//! a `/proc/PID/mem` file stays bound to the address space it was opened on. After the
//! client `exec`s, reads of it return 0 bytes even though the pid lives on in the new
//! program, so a setuid program the client runs next is never read through it. What is
//! checked here is that the fd really is such a file, opened for the access the daemon
//! needs (an `O_PATH` fd of someone else's `/proc/PID/mem` needs no permission to open and
//! must not pass), and that it names the peer's own pid.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::statfs::{fstatfs, PROC_SUPER_MAGIC};

/// The access the daemon needs through a handed-over file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `pread` (`mem`, `pagemap`).
    Read,
    /// `write` (`clear_refs`).
    Write,
}

/// Why a handed-over fd was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProcFdError {
    /// The fd could not be inspected.
    #[error("cannot inspect the {what} fd")]
    Inspect {
        /// Which file.
        what: &'static str,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// An `O_PATH` fd: opening one needs no permission on the file, so it proves nothing.
    #[error("the {what} fd is an O_PATH fd; hand over one opened for {access}")]
    PathOnly {
        /// Which file.
        what: &'static str,
        /// `reading` or `writing`.
        access: &'static str,
    },
    /// Opened without the access the daemon needs.
    #[error("the {what} fd is not open for {access}")]
    WrongMode {
        /// Which file.
        what: &'static str,
        /// `reading` or `writing`.
        access: &'static str,
    },
    /// Not a file of procfs (whatever its name says).
    #[error("the {what} fd is not a procfs file (filesystem magic {magic:#x})")]
    NotProc {
        /// Which file.
        what: &'static str,
        /// The filesystem's magic number.
        magic: i64,
    },
    /// A procfs file, but not the peer's own.
    #[error("expected the client's own {want}, got {got}")]
    NotOwn {
        /// The path it should have.
        want: String,
        /// The path it has.
        got: String,
    },
}

impl Access {
    fn word(self) -> &'static str {
        match self {
            Access::Read => "reading",
            Access::Write => "writing",
        }
    }

    fn allowed_by(self, mode: OFlag) -> bool {
        match (self, mode & OFlag::O_ACCMODE) {
            (_, m) if m == OFlag::O_RDWR => true,
            (Access::Read, m) => m == OFlag::O_RDONLY,
            (Access::Write, m) => m == OFlag::O_WRONLY,
        }
    }
}

/// True if `fd` was opened for writing (`O_RDWR` or `O_WRONLY`).
pub fn opened_for_writing(fd: BorrowedFd<'_>) -> bool {
    fcntl(fd, FcntlArg::F_GETFL).is_ok_and(|f| {
        let mode = OFlag::from_bits_retain(f) & OFlag::O_ACCMODE;
        mode == OFlag::O_RDWR || mode == OFlag::O_WRONLY
    })
}

/// Checks that `fd` is `/proc/<pid>/<what>` on procfs, opened (not `O_PATH`) for `access`.
pub fn check(
    fd: BorrowedFd<'_>,
    pid: i32,
    what: &'static str,
    access: Access,
) -> Result<(), ProcFdError> {
    let inspect = |source| ProcFdError::Inspect { what, source };
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL).map_err(inspect)?);
    if flags.contains(OFlag::O_PATH) {
        return Err(ProcFdError::PathOnly {
            what,
            access: access.word(),
        });
    }
    if !access.allowed_by(flags) {
        return Err(ProcFdError::WrongMode {
            what,
            access: access.word(),
        });
    }
    let fs = fstatfs(fd).map_err(inspect)?;
    if fs.filesystem_type() != PROC_SUPER_MAGIC {
        return Err(ProcFdError::NotProc {
            what,
            magic: fs.filesystem_type().0 as i64,
        });
    }
    let want = format!("/proc/{pid}/{what}");
    let got = super::fd_target(fd)
        .map_err(|e| inspect(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    if got != want {
        return Err(ProcFdError::NotOwn { want, got });
    }
    Ok(())
}

/// Whether the address space a `/proc/PID/mem` file was opened on still exists.
///
/// The kernel answers a read of such a file with 0 bytes once that address space is gone
/// (the process exited, or `exec`ed: the file stays bound to the old one), with `EIO` for an
/// unmapped address of a live one, and with data for a mapped one. Address 0 is never mapped
/// unless `vm.mmap_min_addr` was lowered to 0; either live answer is taken as alive.
pub fn mem_alive(mem: BorrowedFd<'_>) -> bool {
    let mut byte = [0u8; 1];
    loop {
        // SAFETY: `byte` is valid for writes of its length for the whole call.
        let n = unsafe { libc::pread(mem.as_raw_fd(), byte.as_mut_ptr().cast(), 1, 0) };
        match n {
            0 => return false,
            n if n > 0 => return true,
            _ => match Errno::last() {
                Errno::EINTR => continue,
                Errno::EIO | Errno::EFAULT => return true,
                // Anything else (EBADF, EACCES...): the file no longer gives access.
                _ => return false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn me() -> i32 {
        std::process::id() as i32
    }

    fn open_path(path: &str) -> OwnedFd {
        let c = std::ffi::CString::new(path).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        assert!(
            fd >= 0,
            "open O_PATH {path}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a new fd that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn accepts_own_mem_opened_for_reading() {
        let f = File::open("/proc/self/mem").unwrap();
        check(f.as_fd(), me(), "mem", Access::Read).unwrap();
        assert!(mem_alive(f.as_fd()));
    }

    #[test]
    fn refuses_an_o_path_fd_even_of_the_right_file() {
        let fd = open_path(&format!("/proc/{}/mem", me()));
        let e = check(fd.as_fd(), me(), "mem", Access::Read).unwrap_err();
        assert!(matches!(e, ProcFdError::PathOnly { .. }), "{e}");
    }

    #[test]
    fn refuses_another_file_a_wrong_mode_and_another_pid() {
        let null = File::open("/dev/null").unwrap();
        let e = check(null.as_fd(), me(), "mem", Access::Read).unwrap_err();
        assert!(matches!(e, ProcFdError::NotProc { .. }), "{e}");
        let w = OpenOptions::new()
            .write(true)
            .open("/proc/self/mem")
            .unwrap();
        let e = check(w.as_fd(), me(), "mem", Access::Read).unwrap_err();
        assert!(matches!(e, ProcFdError::WrongMode { .. }), "{e}");
        let f = File::open("/proc/self/mem").unwrap();
        let e = check(f.as_fd(), 1, "mem", Access::Read).unwrap_err();
        assert!(matches!(e, ProcFdError::NotOwn { .. }), "{e}");
        let e = check(f.as_fd(), me(), "pagemap", Access::Read).unwrap_err();
        assert!(matches!(e, ProcFdError::NotOwn { .. }), "{e}");
    }

    /// A child's `/proc/self/mem`, opened before it `exec`s: alive before, gone after, although
    /// the pid lives on.
    #[test]
    fn a_mem_file_dies_with_the_exec_of_its_process() {
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};
        // The child opens its own mem file (fd 3 after the shell's dup), reports, then
        // execs `cat`, which keeps fd 3 open across the exec and waits on stdin.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("exec 3</proc/self/mem; echo opened; read _; exec cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "opened");
        // The daemon's view: the client's fd, as received (a dup of it here).
        let mem = File::open(format!("/proc/{pid}/fd/3")).unwrap();
        assert!(mem_alive(mem.as_fd()), "alive before the exec");
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "go").unwrap();
        // Wait until the exec happened (the comm changes to cat).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "cat\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never exec'd"
            );
            std::thread::yield_now();
        }
        assert!(!mem_alive(mem.as_fd()), "gone after the exec");
        drop(stdin);
        child.wait().unwrap();
    }
}
