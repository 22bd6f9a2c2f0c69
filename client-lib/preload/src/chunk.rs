//! The mapping behind a block of glibc's `malloc`, read from the block's chunk header.
//!
//! glibc serves a request at or above its mmap threshold with a mapping of its own and
//! marks the chunk `IS_MMAPPED` (bit 1 of the size word just before the block). Such a
//! chunk starts `prev_size` bytes into its mapping (an offset only `memalign` makes) and
//! the mapping is `prev_size + size` bytes: exactly what glibc's `free` later unmaps. Its
//! `munmap` and `mremap` are glibc's own, not calls through this library, but the kernel
//! reports them on the client's userfaultfd like any other.
//!
//! The header layout (`struct malloc_chunk`: `prev_size`, `size`, then the user's bytes) has
//! not changed since glibc 2.0; it is read only when the `malloc` in use is glibc's
//! (`real::malloc_is_glibcs`).

use std::ffi::c_void;

/// `IS_MMAPPED` in the size word of a chunk.
const IS_MMAPPED: usize = 0x2;
/// The three flag bits of the size word.
const SIZE_BITS: usize = 0x7;
/// The two header words before the user's bytes.
const HEADER: usize = 2 * std::mem::size_of::<usize>();

/// The whole mapping a block lives in, if glibc mapped it for the block alone.
///
/// # Safety
/// `p` is a block glibc's `malloc` family returned and that is not freed yet.
pub unsafe fn mapping_of(p: *mut c_void, page: usize) -> Option<(usize, usize)> {
    if p.is_null() {
        return None;
    }
    let words = p.cast::<usize>();
    // SAFETY: a live glibc block is preceded by its chunk header, two words in the same
    // mapping (or heap); the caller guarantees p is one.
    let size_word = unsafe { words.wrapping_sub(1).read() };
    if size_word & IS_MMAPPED == 0 {
        return None;
    }
    // SAFETY: as above: the first header word.
    let prev_size = unsafe { words.wrapping_sub(2).read() };
    let chunk = (p as usize).checked_sub(HEADER)?;
    let start = chunk.checked_sub(prev_size)?;
    let len = prev_size.checked_add(size_word & !SIZE_BITS)?;
    let aligned = start % page == 0 && len % page == 0 && len > 0;
    aligned.then_some((start, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A glibc block of `n` bytes aligned to `align`, the mapping it is in, freed after.
    fn mapping_of_new_block(align: usize, n: usize) -> (usize, Option<(usize, usize)>) {
        // SAFETY: a plain allocation; checked for null below.
        let p = unsafe { libc::memalign(align, n) };
        assert!(!p.is_null());
        // SAFETY: p is a live block of glibc's allocator (the test harness has no other).
        let found = unsafe { mapping_of(p, 4096) };
        // SAFETY: p came from memalign and is freed once.
        unsafe { libc::free(p) };
        (p as usize, found)
    }

    #[test]
    fn a_large_block_is_its_own_mapping_and_a_small_one_is_not() {
        for (align, n) in [(16, 4 << 20), (1 << 16, 8 << 20)] {
            let (p, found) = mapping_of_new_block(align, n);
            let (start, len) = found.expect("a block of MiBs is mmapped");
            assert!(
                start <= p && p + n <= start + len,
                "{start:#x}+{len:#x} {p:#x}"
            );
            assert!(len < n + align + 2 * 4096, "{len}");
        }
        assert_eq!(mapping_of_new_block(16, 64).1, None);
    }
}
