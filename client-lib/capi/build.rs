//! Link settings of `libmemshadow.so`: the SONAME `libmemshadow.so.MAJOR` (the crate's
//! major version; `systemd/install.sh` installs the file as `libmemshadow.so.X.Y.Z` with
//! the `libmemshadow.so.MAJOR` and `libmemshadow.so` links) and the version script
//! `memshadow.map`. Only the cdylib gets them; `libmemshadow.a` has no SONAME.

// Cargo reads a build script's instructions from its stdout.
#![allow(clippy::print_stdout)]

use std::path::Path;

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let map = Path::new(&dir).join("memshadow.map");
    let script = std::fs::read_to_string(&map)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", map.display()));
    let node = format!("MEMSHADOW_{major} {{");
    assert!(
        script.lines().any(|l| l.trim() == node),
        "{} has no version node `{node}` for major version {major}",
        map.display()
    );
    println!("cargo::rerun-if-changed=memshadow.map");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-cdylib-link-arg=-Wl,-soname,libmemshadow.so.{major}");
    println!(
        "cargo::rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
}
