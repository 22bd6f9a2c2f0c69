//! Device accesses on behalf of the client: reads (collecting written pages first under the
//! `strict` policy) and populate (faulting a range in ahead of reads).

use super::attach::ARM_CHUNK;
use super::{not_mirrored, AddressSpace, WatchError};
use crate::device::EngineAttachment;
use crate::dirty::DirtyPolicy;
use crate::lock;
use crate::notifier::Range;
use crate::sys::PAGE_SIZE;

impl AddressSpace {
    /// A device read of `len` bytes at `offset` of mirror `id`; under the `strict` policy
    /// the pages read are collected first, so the read returns what the client wrote.
    pub fn read(&self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>, WatchError> {
        let addr = self.resolve(id, offset, len as u64)?;
        let strict = lock(&self.table)
            .by_id
            .get(&id)
            .is_some_and(|m| m.policy == DirtyPolicy::Strict);
        if strict && len > 0 {
            let page = PAGE_SIZE as u64;
            let start = addr - addr % page;
            let end = (addr + len as u64).next_multiple_of(page);
            self.sync_ranges(&[(start, end)], 1, &[])?;
        }
        if let Ok(r) = Range::new(addr, len as u64) {
            self.observe_fences(r);
        }
        self.device.read(addr, len).map_err(not_mirrored)
    }

    /// Faults `offset..offset+len` of mirror `id` into the shadow; returns the pages the
    /// mirror then has.
    pub fn populate(&self, id: u64, offset: u64, len: u64) -> Result<u64, WatchError> {
        self.populate_with(id, offset, len, true)
    }

    /// [`AddressSpace::populate`] for an external engine's fault: fenced pages are left out
    /// at once rather than waited for (the engine reads them over its session instead),
    /// since a fence under a client that keeps discarding the range may never lift.
    pub fn engine_fault(&self, id: u64, offset: u64, len: u64) -> Result<u64, WatchError> {
        self.populate_with(id, offset, len, false)
    }

    fn populate_with(
        &self,
        id: u64,
        offset: u64,
        len: u64,
        wait_fences: bool,
    ) -> Result<u64, WatchError> {
        let addr = self.resolve(id, offset, len)?;
        // Nothing is installed in a fenced range: wait for its fences to lift first.
        match Range::new(addr, len) {
            Ok(r) if wait_fences => self.settle_over(r),
            _ => {}
        }
        let end = addr + len;
        let mut at = addr;
        while at < end {
            self.cancelled()?;
            let n = ARM_CHUNK.min(end - at);
            self.device.populate(at, n).map_err(not_mirrored)?;
            at += n;
        }
        Ok(self
            .list()
            .iter()
            .find(|m| m.id == id)
            .map_or(0, |m| m.pages))
    }

    /// Attaches external engine `engine_id` of process `pid` to mirror `id`.
    pub fn attach_engine(
        &self,
        id: u64,
        engine_id: u32,
        pid: i32,
    ) -> Result<EngineAttachment, WatchError> {
        self.after_events_read();
        let dev = {
            let t = lock(&self.table);
            let m = t.by_id.get(&id).ok_or(WatchError::NoSuchMirror(id))?;
            m.dev.ok_or(WatchError::NotMirrored(m.addr))?
        };
        Ok(self.device.attach_engine(dev, engine_id, pid)?)
    }

    /// A device write of `bytes` at `offset` of mirror `id` into the client's memory.
    pub fn device_write(
        &self,
        id: u64,
        offset: u64,
        bytes: &[u8],
        engine: u32,
    ) -> Result<usize, WatchError> {
        let addr = self.resolve(id, offset, bytes.len() as u64)?;
        if let Ok(r) = Range::new(addr, bytes.len() as u64) {
            self.settle_over(r);
        }
        self.device
            .device_write(addr, bytes, engine)
            .map_err(not_mirrored)
    }
}
