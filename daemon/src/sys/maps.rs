//! The mappings of a client, as its own `/proc/self/maps` shows them: which addresses are
//! mapped, and with which protection. Like its `mem` file, the `maps` file a client opened
//! stays bound to that client's address space (it reads nothing after an `exec`), so it
//! answers for the address space that was handed over, whatever the pid names now.
//!
//! Asked with the `PROCMAP_QUERY` ioctl (Linux 6.11) where the kernel has it, else by
//! reading the text of the file.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;

/// One mapping (VMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Readable (not `PROT_NONE`, not write-only).
    pub readable: bool,
    /// Writable (`PROT_WRITE`).
    pub writable: bool,
    /// Shared (`MAP_SHARED`).
    pub shared: bool,
    /// Backed by a file (memfd and shmem included).
    pub file: bool,
    /// Backed by a file of a block device's file system (not memfd, shmem or tmpfs, whose
    /// device is anonymous).
    pub disk_file: bool,
}

/// Why the mappings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The address space is gone (the client exited or `exec`ed).
    #[error("the client's address space is gone")]
    Gone,
    /// Reading or asking failed.
    #[error("cannot read the client's mappings")]
    Io(#[source] std::io::Error),
}

/// `struct procmap_query` (include/uapi/linux/fs.h).
#[repr(C)]
#[derive(Debug, Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}
const _: () = assert!(std::mem::size_of::<ProcmapQuery>() == 104);

nix::ioctl_readwrite!(procmap_query, b'f', 17, ProcmapQuery);
// The number must match the kernel's _IOWR('f', 17, struct procmap_query).
const _: () = assert!(nix::request_code_readwrite!(b'f', 17, 104) == 0xc068_6611);

const VMA_READABLE: u64 = 0x01;
const VMA_WRITABLE: u64 = 0x02;
const VMA_SHARED: u64 = 0x08;
const COVERING_OR_NEXT_VMA: u64 = 0x10;

/// A client's `/proc/self/maps`.
#[derive(Debug)]
pub struct Maps {
    file: File,
}

impl Maps {
    /// Wraps `file`, the client's own `/proc/self/maps` (checked by `procfd`).
    pub fn new(file: File) -> Maps {
        Maps { file }
    }

    /// The mapping that contains `addr`, or else the first one above it; `None` if none.
    pub fn at_or_after(&self, addr: u64) -> Result<Option<Vma>, MapsError> {
        Ok(match self.query(addr) {
            Err(Errno::ENOTTY | Errno::EINVAL) => self.scan_text(addr),
            r => r,
        }?)
    }

    fn query(&self, addr: u64) -> Result<Option<Vma>, Errno> {
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_flags: COVERING_OR_NEXT_VMA,
            query_addr: addr,
            ..ProcmapQuery::default()
        };
        // SAFETY: `q` is a valid, initialised `procmap_query` of the size it declares; the
        // kernel writes only its out fields (no name or build-id buffers are given).
        match unsafe { procmap_query(self.file.as_raw_fd(), &mut q) } {
            Ok(_) => Ok(Some(Vma {
                start: q.vma_start,
                end: q.vma_end,
                readable: q.vma_flags & VMA_READABLE != 0,
                writable: q.vma_flags & VMA_WRITABLE != 0,
                shared: q.vma_flags & VMA_SHARED != 0,
                file: q.inode != 0 || q.dev_major != 0 || q.dev_minor != 0,
                disk_file: q.inode != 0 && q.dev_major != 0,
            })),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`Maps::at_or_after`] from the file's text (kernels before `PROCMAP_QUERY`).
    fn scan_text(&self, addr: u64) -> Result<Option<Vma>, Errno> {
        let mut text = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = loop {
                match self.file.read_at(&mut buf, text.len() as u64) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r,
                }
            }
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
        }
        if text.is_empty() {
            return Err(Errno::ESRCH);
        }
        Ok(String::from_utf8_lossy(&text)
            .lines()
            .filter_map(parse_line)
            .find(|v| v.end > addr))
    }
}

impl From<Errno> for MapsError {
    fn from(e: Errno) -> MapsError {
        match e {
            Errno::ESRCH => MapsError::Gone,
            e => MapsError::Io(e.into()),
        }
    }
}

/// One line of `/proc/PID/maps`: `start-end perms offset dev inode [path]`.
fn parse_line(line: &str) -> Option<Vma> {
    let mut w = line.split_whitespace();
    let (range, perms) = (w.next()?, w.next()?);
    let (_offset, dev, inode) = (w.next()?, w.next()?, w.next()?);
    let (s, e) = range.split_once('-')?;
    let p = perms.as_bytes();
    Some(Vma {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        readable: p.first() == Some(&b'r'),
        writable: p.get(1) == Some(&b'w'),
        shared: p.get(3) == Some(&b's'),
        file: inode != "0" || dev != "00:00",
        disk_file: inode != "0" && !dev.starts_with("00:"),
    })
}

impl Maps {
    /// The first address of `start..end` that no mapping covers, if any.
    pub fn first_hole(&self, start: u64, end: u64) -> Result<Option<u64>, MapsError> {
        let mut at = start;
        while at < end {
            match self.at_or_after(at)? {
                Some(v) if v.start <= at => at = v.end,
                _ => return Ok(Some(at)),
            }
        }
        Ok(None)
    }

    /// The first address of `start..end` that is mapped but not readable, if any.
    pub fn first_unreadable(&self, start: u64, end: u64) -> Result<Option<u64>, MapsError> {
        let mut at = start;
        while at < end {
            match self.at_or_after(at)? {
                Some(v) if v.start < end => {
                    if !v.readable {
                        return Ok(Some(v.start.max(at)));
                    }
                    at = v.end;
                }
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// How many bytes from `start` (at most `len`) are mapped and writable.
    pub fn writable_prefix(&self, start: u64, len: u64) -> Result<u64, MapsError> {
        let end = start.saturating_add(len);
        let mut at = start;
        while at < end {
            match self.at_or_after(at)? {
                Some(v) if v.start <= at && v.writable => at = v.end,
                _ => break,
            }
        }
        Ok(at.min(end) - start)
    }

    /// How many bytes from `start` (at most `len`) are mapped and readable.
    pub fn readable_prefix(&self, start: u64, len: u64) -> Result<u64, MapsError> {
        let end = start.saturating_add(len);
        let mut at = start;
        while at < end {
            match self.at_or_after(at)? {
                Some(v) if v.start <= at && v.readable => at = v.end,
                _ => break,
            }
        }
        Ok(at.min(end) - start)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn me() -> Maps {
        Maps::new(File::open("/proc/self/maps").unwrap())
    }

    fn map(pages: usize, prot: libc::c_int) -> u64 {
        // SAFETY: a fresh anonymous mapping chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * 4096,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as u64
    }

    #[test]
    fn holes_and_protections_are_seen_both_ways() {
        let m = me();
        let a = map(4, libc::PROT_READ | libc::PROT_WRITE);
        // A hole in the middle, and a PROT_NONE page at the end.
        // SAFETY: our own mapping.
        unsafe { libc::munmap((a + 4096) as *mut libc::c_void, 4096) };
        // SAFETY: our own mapping.
        unsafe { libc::mprotect((a + 3 * 4096) as *mut libc::c_void, 4096, libc::PROT_NONE) };
        assert_eq!(m.first_hole(a, a + 4 * 4096).unwrap(), Some(a + 4096));
        assert_eq!(m.first_hole(a + 2 * 4096, a + 4 * 4096).unwrap(), None);
        assert_eq!(
            m.first_unreadable(a + 2 * 4096, a + 4 * 4096).unwrap(),
            Some(a + 3 * 4096)
        );
        assert_eq!(m.readable_prefix(a + 2 * 4096, 2 * 4096).unwrap(), 4096);
        assert_eq!(m.readable_prefix(a, 2 * 4096).unwrap(), 4096);
        // The text fallback agrees with the ioctl (on what other test threads cannot change:
        // their mappings may merge with ours, moving the bounds).
        for addr in [a, a + 2 * 4096, a + 3 * 4096] {
            let (q, t) = (
                m.query(addr).unwrap().unwrap(),
                m.scan_text(addr).unwrap().unwrap(),
            );
            assert!(q.start <= addr && addr < q.end && t.start <= addr && addr < t.end);
            assert_eq!(
                (q.readable, q.shared, q.file),
                (t.readable, t.shared, t.file)
            );
        }
        let hole = a + 4096;
        assert!(m.query(hole).unwrap().is_some_and(|v| v.start > hole));
        assert!(m.scan_text(hole).unwrap().is_some_and(|v| v.start > hole));
        // SAFETY: our own mapping.
        unsafe { libc::munmap(a as *mut libc::c_void, 4 * 4096) };
    }

    #[test]
    fn a_maps_file_dies_with_the_exec_of_its_process() {
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("exec 3</proc/self/maps; echo opened; read _; exec cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let maps = Maps::new(File::open(format!("/proc/{pid}/fd/3")).unwrap());
        assert!(maps.at_or_after(0).unwrap().is_some());
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "go").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "cat\n" {
            assert!(std::time::Instant::now() < deadline);
            std::thread::yield_now();
        }
        assert!(matches!(maps.at_or_after(0), Err(MapsError::Gone)));
        drop(stdin);
        child.wait().unwrap();
    }
}
