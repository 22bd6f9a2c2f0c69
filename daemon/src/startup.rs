//! What must hold before memshadowd serves anything: checks made once at start-up, before
//! the socket, the device or any thread exists.

use crate::sys::PAGE_SIZE;

/// The kernel's page size is not the one memshadowd is built for, or cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PageSizeError {
    /// `sysconf(_SC_PAGESIZE)` failed.
    #[error("cannot read the kernel's page size (sysconf(_SC_PAGESIZE))")]
    Unreadable(#[source] nix::Error),
    /// `sysconf(_SC_PAGESIZE)` gave no value.
    #[error("the kernel reports no page size (sysconf(_SC_PAGESIZE))")]
    Unreported,
    /// The kernel's pages are of another size.
    #[error(
        "the kernel's page size is {kernel} bytes, and memshadowd is built for {built}-byte \
         pages (PAGE_SIZE in daemon/src/sys/mod.rs): it cannot run on this kernel"
    )]
    Differs {
        /// The kernel's page size.
        kernel: usize,
        /// The page size memshadowd is built for.
        built: usize,
    },
}

/// Refuses a kernel whose page size is `kernel` unless it is the page size memshadowd is
/// built for ([`PAGE_SIZE`]): shadow slots, the device page table, uffd ranges, pagemap
/// words and the wire's `page_size` all count in those pages.
pub fn check_page_size(kernel: usize) -> Result<(), PageSizeError> {
    if kernel == PAGE_SIZE {
        Ok(())
    } else {
        Err(PageSizeError::Differs {
            kernel,
            built: PAGE_SIZE,
        })
    }
}

/// The kernel's page size (`sysconf(_SC_PAGESIZE)`).
pub fn kernel_page_size() -> Result<usize, PageSizeError> {
    let v = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .map_err(PageSizeError::Unreadable)?
        .ok_or(PageSizeError::Unreported)?;
    usize::try_from(v).map_err(|_| PageSizeError::Unreported)
}

/// Checks this kernel's page size ([`check_page_size`]).
pub fn check_kernel_page_size() -> Result<(), PageSizeError> {
    check_page_size(kernel_page_size()?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_built_page_size_is_accepted() {
        assert!(check_page_size(PAGE_SIZE).is_ok());
    }

    #[test]
    fn another_page_size_is_refused_saying_both() {
        for kernel in [16 * 1024, 64 * 1024, 2048] {
            let e = check_page_size(kernel).unwrap_err();
            assert!(
                matches!(e, PageSizeError::Differs { kernel: k, built: PAGE_SIZE } if k == kernel),
                "{e:?}"
            );
            let text = e.to_string();
            assert!(
                text.starts_with(&format!(
                    "the kernel's page size is {kernel} bytes, and memshadowd is built for \
                     {PAGE_SIZE}-byte pages"
                )),
                "{text}"
            );
        }
    }

    /// The machines the tests run on have the page size memshadowd is built for.
    #[test]
    fn this_kernel_passes() {
        assert!(matches!(kernel_page_size(), Ok(PAGE_SIZE)));
        assert!(check_kernel_page_size().is_ok());
    }
}
