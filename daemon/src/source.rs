//! Where mirrored pages come from (docs/design.md §4 fault path, §5 G7): a client's memory, read
//! in large batches (iovec arrays), never a system call per page.
//!
//! * [`MemFileSource`]: `preadv` on a `/proc/PID/mem` file the client opened itself and handed
//!   over: the only path to a client's memory. The kernel checked the client's access when
//!   it opened the file, and the file stays bound to the address space it was opened on, so
//!   after an `exec` (of a setuid program, say) it reads nothing (docs/threat-model.md);
//! * [`ProcessVmSource`]: `process_vm_readv` on a pid, for the daemon's own memory in tests
//!   and benchmarks only. Never for a client: a pid names whatever program the process
//!   `exec`s next, and a root daemon may read any of them;
//! * [`SimMemory`]: an in-process simulated address space for tests and benchmarks.

use crate::lock;
use std::fs::File;
use std::io::IoSliceMut;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use crate::sys::maps::{Maps, MapsError};
use crate::sys::{self, PAGE_SIZE};
use std::sync::Arc;

/// Errors of reading client memory.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The address space the source was bound to is gone: the client exited or `exec`ed.
    #[error("the client's address space is gone (it exited or exec'd)")]
    Gone,
    /// The client's memory at the address is mapped without read permission
    /// (`PROT_NONE`): the device may not read it, as a device could not.
    #[error("address {addr:#x} is not readable (its mapping is PROT_NONE or write-only)")]
    NotReadable {
        /// The address.
        addr: u64,
    },
    /// A device write where the client's mapping is not writable, or to a client that did
    /// not hand over a writable `/proc/self/mem`.
    #[error("address {addr:#x} is not writable by the device (read-only mapping, or the client did not allow device writes)")]
    NotWritable {
        /// The address.
        addr: u64,
    },
    /// The system call failed.
    #[error("cannot access client memory at {addr:#x} via {via}")]
    Io {
        /// First address of the failed read.
        addr: u64,
        /// Which access path.
        via: &'static str,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
}

/// A client's memory, as the fault path reads it.
pub trait MemorySource: Send + Sync {
    /// Fills `dst` from the client's memory starting at `addr` (page aligned; `dst` is a list
    /// of whole pages to fill in order). Returns the bytes filled: short if the range stops
    /// being mapped part-way, 0 if `addr` itself is not mapped.
    fn read_pages(&self, addr: u64, dst: &mut [IoSliceMut<'_>]) -> Result<usize, SourceError>;

    /// [`MemorySource::read_pages`] for bytes that are returned, never installed in the
    /// shadow (a source that prepares pages it copies for the shadow skips that).
    fn read_uncached(&self, addr: u64, dst: &mut [IoSliceMut<'_>]) -> Result<usize, SourceError> {
        self.read_pages(addr, dst)
    }

    /// Writes `src` into the client's memory at `addr` (a device write), only where the
    /// client's mappings allow writing. Returns the bytes written (short where a mapping
    /// stops being writable).
    fn write_bytes(&self, addr: u64, _src: &[u8]) -> Result<usize, SourceError> {
        Err(SourceError::NotWritable { addr })
    }

    /// Short name of the access path, for logs and status.
    fn kind(&self) -> &'static str;

    /// False once the address space behind the source is gone for good (the client exited
    /// or `exec`ed); reads then fail with [`SourceError::Gone`].
    fn alive(&self) -> bool {
        true
    }
}

fn io_err(addr: u64, via: &'static str, e: nix::Error) -> SourceError {
    SourceError::Io {
        addr,
        via,
        source: e.into(),
    }
}

/// Reads with `process_vm_readv(2)` (needs ptrace-read access to the process).
#[derive(Debug)]
pub struct ProcessVmSource {
    pid: i32,
    /// Pins the identity of `pid` (G7): a read counts only if the process was still alive
    /// after it, so a recycled pid is never read.
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl ProcessVmSource {
    /// Reads process `pid` (tests and benchmarks of our own process).
    pub fn new(pid: i32) -> Self {
        ProcessVmSource { pid, pidfd: None }
    }

    /// Reads the process behind `pidfd`, whose pid is `pid`.
    pub fn pinned(pid: i32, pidfd: std::os::fd::OwnedFd) -> Self {
        ProcessVmSource {
            pid,
            pidfd: Some(pidfd),
        }
    }
}

impl MemorySource for ProcessVmSource {
    fn read_pages(&self, addr: u64, dst: &mut [IoSliceMut<'_>]) -> Result<usize, SourceError> {
        let n = match sys::read_remote(self.pid, addr, dst) {
            Ok(n) => n,
            Err(nix::Error::EFAULT) => 0,
            Err(e) => return Err(io_err(addr, "process_vm_readv", e)),
        };
        if let Some(pidfd) = &self.pidfd {
            use std::os::fd::AsFd;
            if !sys::pidfd_alive(pidfd.as_fd()) {
                return Err(io_err(addr, "process_vm_readv", nix::Error::ESRCH));
            }
        }
        Ok(n)
    }

    fn kind(&self) -> &'static str {
        "process_vm_readv"
    }
}

/// Reads with `preadv(2)` on an open `/proc/PID/mem`, only where the client's mappings
/// allow reading (the file itself ignores protections: the kernel reads it with
/// `FOLL_FORCE`), when the client handed over its `/proc/self/maps`.
#[derive(Debug)]
pub struct MemFileSource {
    file: File,
    maps: Option<Arc<Maps>>,
    /// The client opened the file for writing too (it allows device writes).
    writable: bool,
}

impl MemFileSource {
    /// Reads through `file`, an open `/proc/PID/mem`, checking protections in `maps`.
    pub fn new(file: File, maps: Option<Arc<Maps>>) -> Self {
        use std::os::fd::AsFd;
        let writable = sys::procfd::opened_for_writing(file.as_fd());
        MemFileSource {
            file,
            maps,
            writable,
        }
    }

    /// The bytes of `want` from `addr` that may be read: all, without a maps file.
    fn readable(&self, addr: u64, want: usize) -> Result<usize, SourceError> {
        let Some(maps) = &self.maps else {
            return Ok(want);
        };
        let n = maps
            .readable_prefix(addr, want as u64)
            .map_err(|e| match e {
                MapsError::Gone => SourceError::Gone,
                MapsError::Io(source) => SourceError::Io {
                    addr,
                    via: "/proc/PID/maps",
                    source,
                },
            })?;
        if n == 0 && maps.first_hole(addr, addr + 1).ok().flatten().is_none() {
            return Err(SourceError::NotReadable { addr });
        }
        Ok(usize::try_from(n).unwrap_or(want).min(want))
    }
}

impl MemorySource for MemFileSource {
    fn read_pages(&self, addr: u64, dst: &mut [IoSliceMut<'_>]) -> Result<usize, SourceError> {
        let want: usize = dst.iter().map(|b| b.len()).sum();
        let allowed = self.readable(addr, want)?;
        if allowed < want {
            // Read only what may be read: whole leading buffers (pages).
            let mut keep = 0;
            let mut bytes = 0;
            while keep < dst.len() && bytes + dst[keep].len() <= allowed {
                bytes += dst[keep].len();
                keep += 1;
            }
            return self.read_all(addr, &mut dst[..keep]);
        }
        self.read_all(addr, dst)
    }

    fn write_bytes(&self, addr: u64, src: &[u8]) -> Result<usize, SourceError> {
        // The file writes with FOLL_FORCE, through any protection: check the mappings (a
        // device write needs them, and the client's consent, a writable mem file).
        let Some(maps) = self.maps.as_ref().filter(|_| self.writable) else {
            return Err(SourceError::NotWritable { addr });
        };
        let n = maps
            .writable_prefix(addr, src.len() as u64)
            .map_err(|e| match e {
                MapsError::Gone => SourceError::Gone,
                MapsError::Io(source) => SourceError::Io {
                    addr,
                    via: "/proc/PID/maps",
                    source,
                },
            })?;
        if n == 0 {
            return Err(SourceError::NotWritable { addr });
        }
        let n = usize::try_from(n).unwrap_or(src.len()).min(src.len());
        match nix::sys::uio::pwrite(&self.file, &src[..n], addr as i64) {
            Ok(w) => Ok(w),
            Err(nix::Error::ESRCH) => Err(SourceError::Gone),
            Err(e) => Err(io_err(addr, "/proc/PID/mem", e)),
        }
    }

    fn kind(&self) -> &'static str {
        "proc-mem"
    }

    fn alive(&self) -> bool {
        use std::os::fd::AsFd;
        sys::procfd::mem_alive(self.file.as_fd())
    }
}

impl MemFileSource {
    fn read_all(&self, addr: u64, dst: &mut [IoSliceMut<'_>]) -> Result<usize, SourceError> {
        if dst.is_empty() {
            return Ok(0);
        }
        match sys::read_mem_file(&self.file, addr, dst) {
            Ok(n) => Ok(n),
            Err(nix::Error::EIO | nix::Error::EFAULT) => Ok(0),
            Err(nix::Error::ESRCH) => Err(SourceError::Gone),
            Err(e) => Err(io_err(addr, "/proc/PID/mem", e)),
        }
    }
}

/// A simulated address space for tests and benchmarks: `pages` pages from `base`, each
/// mapped or not, written and read concurrently (a page is copied under its own lock, so a
/// read never sees half of a write).
#[derive(Debug)]
pub struct SimMemory {
    base: u64,
    pages: Vec<Mutex<Box<[u8]>>>,
    mapped: Vec<AtomicU8>,
}

impl SimMemory {
    /// `pages` mapped, zeroed pages from `base` (page aligned).
    pub fn new(base: u64, pages: usize) -> Self {
        SimMemory {
            base,
            pages: (0..pages)
                .map(|_| Mutex::new(vec![0u8; PAGE_SIZE].into_boxed_slice()))
                .collect(),
            mapped: (0..pages).map(|_| AtomicU8::new(1)).collect(),
        }
    }

    /// First address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    fn index(&self, addr: u64) -> Option<usize> {
        let off = addr.checked_sub(self.base)?;
        let i = usize::try_from(off / PAGE_SIZE as u64).ok()?;
        (i < self.pages.len()).then_some(i)
    }

    /// Fills the page at `addr` with `byte`.
    pub fn fill_page(&self, addr: u64, byte: u8) {
        if let Some(i) = self.index(addr) {
            lock(&self.pages[i]).fill(byte);
        }
    }

    /// Writes `data` into the page at `addr` from its start.
    pub fn write_page(&self, addr: u64, data: &[u8]) {
        if let Some(i) = self.index(addr) {
            let mut p = lock(&self.pages[i]);
            let n = data.len().min(PAGE_SIZE);
            p[..n].copy_from_slice(&data[..n]);
        }
    }

    /// Marks the page at `addr` mapped or not; an unmapped page reads as "not mapped".
    pub fn set_mapped(&self, addr: u64, mapped: bool) {
        if let Some(i) = self.index(addr) {
            self.mapped[i].store(u8::from(mapped), Ordering::SeqCst);
        }
    }
}

impl MemorySource for SimMemory {
    fn read_pages(&self, addr: u64, dst: &mut [IoSliceMut<'_>]) -> Result<usize, SourceError> {
        let mut done = 0;
        let mut a = addr;
        for buf in dst.iter_mut() {
            let mut off = 0;
            while off < buf.len() {
                let Some(i) = self.index(a) else {
                    return Ok(done);
                };
                if self.mapped[i].load(Ordering::SeqCst) == 0 {
                    return Ok(done);
                }
                let in_page = (a % PAGE_SIZE as u64) as usize;
                let n = (PAGE_SIZE - in_page).min(buf.len() - off);
                let page = lock(&self.pages[i]);
                buf[off..off + n].copy_from_slice(&page[in_page..in_page + n]);
                off += n;
                a += n as u64;
                done += n;
            }
        }
        Ok(done)
    }

    fn write_bytes(&self, addr: u64, src: &[u8]) -> Result<usize, SourceError> {
        let mut done = 0;
        while done < src.len() {
            let at = addr + done as u64;
            let page = at - at % PAGE_SIZE as u64;
            let Some(i) = self.index(page) else { break };
            if self.mapped[i].load(Ordering::Acquire) == 0 {
                break;
            }
            let off = (at - page) as usize;
            let n = (PAGE_SIZE - off).min(src.len() - done);
            lock(&self.pages[i])[off..off + n].copy_from_slice(&src[done..done + n]);
            done += n;
        }
        if done == 0 {
            return Err(SourceError::NotWritable { addr });
        }
        Ok(done)
    }

    fn kind(&self) -> &'static str {
        "simulated"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_memory_reads_until_an_unmapped_page() {
        let m = SimMemory::new(0x10000, 4);
        m.fill_page(0x10000, 1);
        m.fill_page(0x11000, 2);
        m.set_mapped(0x12000, false);
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        let mut c = vec![0u8; PAGE_SIZE];
        let n = m
            .read_pages(
                0x10000,
                &mut [
                    IoSliceMut::new(&mut a),
                    IoSliceMut::new(&mut b),
                    IoSliceMut::new(&mut c),
                ],
            )
            .expect("read");
        assert_eq!(n, 2 * PAGE_SIZE);
        assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2));
        assert_eq!(
            m.read_pages(0x20000, &mut [IoSliceMut::new(&mut a)])
                .expect("read"),
            0
        );
    }

    #[test]
    fn process_vm_source_reads_our_own_pages_and_reports_unmapped_as_zero() {
        let buf: Vec<u8> = (0..2 * PAGE_SIZE).map(|i| i as u8).collect();
        let src = ProcessVmSource::new(std::process::id() as i32);
        let mut out = vec![0u8; 2 * PAGE_SIZE];
        let n = src
            .read_pages(buf.as_ptr() as u64, &mut [IoSliceMut::new(&mut out)])
            .expect("read");
        assert_eq!(n, out.len());
        assert_eq!(out, buf);
        // Page 0 is never mapped.
        assert_eq!(
            src.read_pages(0, &mut [IoSliceMut::new(&mut out)])
                .expect("read"),
            0
        );
        let mem = MemFileSource::new(File::open("/proc/self/mem").expect("open"), None);
        assert_eq!(
            mem.read_pages(0, &mut [IoSliceMut::new(&mut out)])
                .expect("read"),
            0
        );
    }
}
