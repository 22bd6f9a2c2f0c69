//! The install script: what it stages under a DESTDIR, for this tree and for a tree where
//! every artifact exists, and that it refuses a library of another major version.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use memshadow_tests::{
    binary, daemon_command, find_program, path_with_system_dirs, repo_root, skip, TempDir,
};

use crate::unit;

/// The install script stages binaries, units (ExecStart rewritten), the example config
/// (never overwriting an existing one), the header, pkg-config file and libraries when they
/// exist (the shared one as `libmemshadow.so.X.Y.Z` with the links `libmemshadow.so.X` and
/// `libmemshadow.so`), and the memshadow group, all under a DESTDIR; on this tree, what is
/// not built yet is skipped with a message.
#[test]
fn install_script_stages_everything_under_destdir() {
    let script = repo_root().join("systemd/install.sh");
    let run = |args: &[&str]| -> String {
        let out = Command::new("bash")
            .arg(&script)
            .args(args)
            .env_remove("DESTDIR")
            // groupadd lives in /usr/sbin, off a plain user's PATH.
            .env("PATH", path_with_system_dirs())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "install.sh {args:?} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let bins = binary("memshadowd").parent().unwrap().to_owned();
    // Without groupadd the script skips the group and says so; this test then does not
    // check the group.
    let have_groupadd = find_program("groupadd").is_some();
    if !have_groupadd {
        skip("did not check the memshadow group: needs groupadd (Debian package passwd)");
    }

    // 1. This tree, into a staging root with its own /etc/group.
    let stage = TempDir::new("install");
    let d = stage.path();
    std::fs::create_dir_all(d.join("etc")).unwrap();
    std::fs::write(d.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(d.join("etc/gshadow"), "root:*::\n").unwrap();
    let out = run(&[
        "--destdir",
        d.to_str().unwrap(),
        "--from",
        bins.to_str().unwrap(),
        "--no-build",
    ]);
    let bin = d.join("usr/local/bin/memshadowd");
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(binary("memshadowd")).unwrap()
    );
    assert_eq!(std::fs::metadata(&bin).unwrap().mode() & 0o777, 0o755);
    let units = d.join("usr/local/lib/systemd/system");
    assert_eq!(
        std::fs::read_to_string(units.join("memshadowd.service")).unwrap(),
        unit("memshadowd.service"),
        "prefix /usr/local: ExecStart stays /usr/local/bin/memshadowd"
    );
    assert_eq!(
        std::fs::read_to_string(units.join("memshadowd.socket")).unwrap(),
        unit("memshadowd.socket")
    );
    let conf = d.join("etc/memshadow/memshadowd.toml");
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        unit("memshadowd.toml")
    );
    let check = daemon_command(&["--config", conf.to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    assert!(check.status.success(), "the installed config is valid");
    let version = env!("CARGO_PKG_VERSION");
    let major = env!("CARGO_PKG_VERSION_MAJOR");
    let real = format!("libmemshadow.so.{version}");
    let soname = format!("libmemshadow.so.{major}");
    for (artifact, path) in [
        ("memshadowctl", "usr/local/bin/memshadowctl"),
        ("libmemshadow.so", "usr/local/lib/libmemshadow.so"),
        ("libmemshadow.so", &format!("usr/local/lib/{real}")),
        ("libmemshadow.so", &format!("usr/local/lib/{soname}")),
        ("libmemshadow.a", "usr/local/lib/libmemshadow.a"),
    ] {
        let built = bins.join(artifact).exists();
        assert_eq!(d.join(path).exists(), built, "{artifact}");
        if !built {
            assert!(
                out.contains(&format!("skipped {artifact}: not built")),
                "{out}"
            );
        }
    }
    if bins.join("libmemshadow.so").exists() {
        let lib = d.join("usr/local/lib");
        assert_eq!(
            std::fs::read(lib.join(&real)).unwrap(),
            std::fs::read(bins.join("libmemshadow.so")).unwrap()
        );
        assert_eq!(
            std::fs::read_link(lib.join(&soname)).unwrap(),
            Path::new(&real)
        );
        assert_eq!(
            std::fs::read_link(lib.join("libmemshadow.so")).unwrap(),
            Path::new(&soname)
        );
        assert!(
            out.contains("next (on the target machine): ldconfig"),
            "{out}"
        );
    }
    for (src, path, name) in [
        (
            "client-lib/include/memshadow.h",
            "usr/local/include/memshadow.h",
            "memshadow.h",
        ),
        (
            "client-lib/memshadow.pc.in",
            "usr/local/lib/pkgconfig/memshadow.pc",
            "memshadow.pc",
        ),
    ] {
        let present = repo_root().join(src).exists();
        assert_eq!(d.join(path).exists(), present, "{name}");
        if !present {
            assert!(out.contains(&format!("skipped {name}: ")), "{out}");
        }
    }
    if have_groupadd {
        let groups = std::fs::read_to_string(d.join("etc/group")).unwrap();
        assert!(
            groups.lines().any(|l| l.starts_with("memshadow:x:")),
            "{groups}"
        );
    } else {
        assert!(
            out.contains("skipped group memshadow: no groupadd here"),
            "{out}"
        );
    }
    // Again, over an edited configuration: kept.
    std::fs::write(&conf, "workers = 7\n").unwrap();
    let out = run(&[
        "--destdir",
        d.to_str().unwrap(),
        "--from",
        bins.to_str().unwrap(),
        "--no-build",
    ]);
    assert!(out.contains("kept "), "{out}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "workers = 7\n");
    assert_eq!(
        std::fs::read_to_string(d.join("etc/memshadow/memshadowd.toml.example")).unwrap(),
        unit("memshadowd.toml")
    );
    if have_groupadd {
        assert!(out.contains("group memshadow exists"), "{out}");
    }

    // 2. A tree where the C ABI artifacts exist (as the capi work adds them), prefix /usr.
    let src = TempDir::new("install-src");
    let s = src.path();
    std::fs::create_dir_all(s.join("systemd")).unwrap();
    std::fs::create_dir_all(s.join("client-lib/include")).unwrap();
    for f in ["memshadowd.service", "memshadowd.socket", "memshadowd.toml"] {
        std::fs::write(s.join("systemd").join(f), unit(f)).unwrap();
    }
    std::fs::write(
        s.join("Cargo.toml"),
        "[workspace.package]\nversion = \"9.8.7\"\n",
    )
    .unwrap();
    std::fs::write(s.join("client-lib/include/memshadow.h"), "/* header */\n").unwrap();
    std::fs::write(
        s.join("client-lib/memshadow.pc.in"),
        "prefix=@PREFIX@\nlibdir=@LIBDIR@\nincludedir=@INCLUDEDIR@\nVersion: @VERSION@\n",
    )
    .unwrap();
    let from = TempDir::new("install-bins");
    let fb = from.path();
    std::fs::copy(binary("memshadowd"), fb.join("memshadowd")).unwrap();
    std::fs::copy(binary("test-client"), fb.join("memshadowctl")).unwrap();
    std::fs::write(fb.join("libmemshadow.so"), "so").unwrap();
    std::fs::write(fb.join("libmemshadow.a"), "a").unwrap();
    let stage2 = TempDir::new("install2");
    let d = stage2.path();
    let out = run(&[
        "--srcdir",
        s.to_str().unwrap(),
        "--destdir",
        d.to_str().unwrap(),
        "--from",
        fb.to_str().unwrap(),
        "--prefix",
        "/usr",
        "--no-build",
        "--no-group",
    ]);
    for p in [
        "usr/bin/memshadowd",
        "usr/bin/memshadowctl",
        "usr/lib/libmemshadow.so.9.8.7",
        "usr/lib/libmemshadow.a",
        "usr/include/memshadow.h",
        "etc/memshadow/memshadowd.toml",
    ] {
        assert!(d.join(p).is_file(), "{p} missing:\n{out}");
    }
    // The major version of 9.8.7 names the SONAME link (the stand-in library is no ELF
    // file, so its SONAME is not checked).
    for (link, to) in [
        ("usr/lib/libmemshadow.so.9", "libmemshadow.so.9.8.7"),
        ("usr/lib/libmemshadow.so", "libmemshadow.so.9"),
    ] {
        assert_eq!(std::fs::read_link(d.join(link)).unwrap(), Path::new(to));
    }
    assert_eq!(
        std::fs::read(d.join("usr/lib/libmemshadow.so")).unwrap(),
        b"so"
    );

    // The real library (SONAME libmemshadow.so.0) does not pass for version 9.8.7.
    let have_readelf = find_program("readelf").is_some();
    if !have_readelf {
        skip("did not check the SONAME of another major version: needs readelf (Debian package binutils)");
    }
    if bins.join("libmemshadow.so").exists() && have_readelf {
        std::fs::copy(bins.join("libmemshadow.so"), fb.join("libmemshadow.so")).unwrap();
        let stage3 = TempDir::new("install3");
        let o = Command::new("bash")
            .arg(&script)
            .args(["--srcdir", s.to_str().unwrap(), "--destdir"])
            .arg(stage3.path())
            .args(["--from", fb.to_str().unwrap(), "--no-build", "--no-group"])
            .env_remove("DESTDIR")
            .env("PATH", path_with_system_dirs())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "installed a library of another major version"
        );
        assert!(
            err.contains("has the SONAME libmemshadow.so.0, not libmemshadow.so.9"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(d.join("usr/lib/pkgconfig/memshadow.pc")).unwrap(),
        "prefix=/usr\nlibdir=/usr/lib\nincludedir=/usr/include\nVersion: 9.8.7\n"
    );
    let service =
        std::fs::read_to_string(d.join("usr/lib/systemd/system/memshadowd.service")).unwrap();
    assert!(
        service
            .lines()
            .any(|l| l == "ExecStart=/usr/bin/memshadowd"),
        "ExecStart follows the prefix"
    );
    assert!(out.contains("skipped group memshadow: --no-group"), "{out}");
    assert!(!d.join("etc/group").exists());
}
