//! `client-lib/include/memshadow.h` is what cbindgen makes of `src/lib.rs` now: fails when
//! the checked-in header is stale; `MEMSHADOW_BLESS=1` rewrites it.

use std::path::Path;

const BLESS: &str = "MEMSHADOW_BLESS=1 cargo test -p memshadow-capi --test header";

/// `MEMSHADOW_VERSION_*`: the crate's version, so a version bump makes the header stale
/// until it is regenerated.
fn version_macros() -> String {
    format!(
        "\n/** The version of libmemshadow this header belongs to (memshadow_version() is the \
         one loaded at run time). */\n\
         #define MEMSHADOW_VERSION_MAJOR {}\n\
         #define MEMSHADOW_VERSION_MINOR {}\n\
         #define MEMSHADOW_VERSION_PATCH {}",
        env!("CARGO_PKG_VERSION_MAJOR"),
        env!("CARGO_PKG_VERSION_MINOR"),
        env!("CARGO_PKG_VERSION_PATCH"),
    )
}

#[test]
fn the_checked_in_header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config = cbindgen::Config::from_file(dir.join("cbindgen.toml"))
        .expect("read client-lib/capi/cbindgen.toml");
    config.after_includes = Some(version_macros());
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen could not generate the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = dir
        .parent()
        .expect("client-lib/")
        .join("include/memshadow.h");
    if std::env::var_os("MEMSHADOW_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write client-lib/include/memshadow.h");
        return;
    }
    let current = std::fs::read(&path).unwrap_or_default();
    if current != fresh {
        let (old, new) = (
            String::from_utf8_lossy(&current),
            String::from_utf8_lossy(&fresh),
        );
        let first = old
            .lines()
            .zip(new.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| old.lines().count().min(new.lines().count()));
        panic!(
            "{} is stale; run {BLESS}\nfirst difference at line {}:\n  checked in: {:?}\n  generated:  {:?}",
            path.display(),
            first + 1,
            old.lines().nth(first).unwrap_or("<end of file>"),
            new.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
}
