//! Unit tests that cannot run here: the same skip list as the integration tests'
//! (`tests/lib.rs`, printed at the end by `tests/run.sh`), so that a plain user's run says
//! what it left out and why, and `MEMSHADOW_TESTS_REQUIRE_ALL=1` (set by `.ci/run`) makes a
//! skip a failure.
//!
//! A test that needs a userfaultfd without `UFFD_USER_MODE_ONLY` starts with
//! `crate::test_support::needs_full_userfaultfd!();`.

use std::io::Write;
use std::path::PathBuf;

/// Returns from the test (after recording the skip) unless this process may create a
/// userfaultfd that also reports the kernel's faults: root, `CAP_SYS_PTRACE` or
/// `vm.unprivileged_userfaultfd = 1`.
macro_rules! needs_full_userfaultfd {
    () => {
        if !$crate::test_support::full_userfaultfd() {
            return;
        }
    };
}
pub(crate) use needs_full_userfaultfd;

/// Whether a userfaultfd without `UFFD_USER_MODE_ONLY` can be created; if not, the running
/// test is skipped, saying so.
pub(crate) fn full_userfaultfd() -> bool {
    // SAFETY: a plain system call; a non-negative result is a new fd, closed right away.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd >= 0 {
        // SAFETY: the fd was just created here and nothing else knows it.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    skip(&format!(
        "needs root (or vm.unprivileged_userfaultfd = 1): a userfaultfd without \
         UFFD_USER_MODE_ONLY is refused here ({})",
        std::io::Error::last_os_error()
    ));
    false
}

/// Records the running test in the skip list with `why` and says so on stderr (not
/// captured by the test runner); a failure under `MEMSHADOW_TESTS_REQUIRE_ALL=1`.
pub(crate) fn skip(why: &str) {
    let thread = std::thread::current();
    let line = format!("memshadow_daemon {}: {why}", thread.name().unwrap_or("?"));
    let require_all =
        std::env::var("MEMSHADOW_TESTS_REQUIRE_ALL").is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(
        !require_all,
        "{line} (MEMSHADOW_TESTS_REQUIRE_ALL is set: every test must run)"
    );
    let dir = skip_dir();
    let recorded = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.skip", std::process::id())))?
            .write_all(format!("{line}\n").as_bytes())
    });
    let _ = writeln!(std::io::stderr(), "SKIPPED {line}");
    if let Err(e) = recorded {
        let _ = writeln!(
            std::io::stderr(),
            "(could not add it to the skip list in {}: {e})",
            dir.display()
        );
    }
}

/// `MEMSHADOW_SKIP_DIR`, else `memshadow-skips/` in cargo's target directory (the test
/// binary is `target/<profile>/deps/NAME-HASH`).
fn skip_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MEMSHADOW_SKIP_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .nth(3)
        .map_or_else(std::env::temp_dir, std::path::Path::to_owned)
        .join("memshadow-skips")
}
