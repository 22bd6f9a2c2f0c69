//! `libmemshadow_preload.so`: attaches an unmodified program's large anonymous mappings to
//! memshadowd. `memshadow-run` starts a program with it in `LD_PRELOAD` and its policy in
//! the environment (`memshadow::run`); docs/preload.md says what is wrapped, and why.
//!
//! * [`session`]: the session with the daemon, opened by the constructor below.
//! * [`hooks`]: the wrapped symbols (`mmap`, `mremap`, the `malloc` family).
//! * [`real`]: the definitions they stand in front of.
//! * [`chunk`]: which mapping a large block of glibc's `malloc` is.

mod chunk;
mod fds;
mod hooks;
mod real;
mod session;

/// Runs when the library is loaded, before the program's `main`, on its one thread. (In
/// this crate's unit tests it does nothing: their harness links the wrappers, and no
/// session is wanted.)
extern "C" fn loaded() {
    if cfg!(test) {
        return;
    }
    real::look_up_all();
    hooks::during_start(session::start);
}

/// The library's constructor: the dynamic loader calls each function of `.init_array`.
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = loaded;
