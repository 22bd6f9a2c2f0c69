//! Socket discovery as a plain user meets it: a daemon at the system socket
//! (`/run/memshadow/memshadowd.sock`, mode 0660, group G, as `memshadowd.socket` makes it),
//! and users with no environment at all (`env -i`): a member of G reaches it with
//! `memshadowctl status` and with the C library (connect, attach with a policy, read); a user
//! outside G is told to join G and `memshadowctl` exits 4; a user listed in G whose process
//! lacks it is told to log in again.
//!
//! The system socket is the real path, so the daemon runs in a mount namespace of its own
//! (`unshare --mount`, a tmpfs on `/run`): nothing outside the test sees it, and a system
//! daemon, if one runs here, is not disturbed. The group and the two users are created for
//! the test and removed after it. Needs root; without root, or without `unshare`,
//! `runuser`, `setpriv`, `useradd` or `cc`, it says so (into the tests' skip list) and passes,
//! unless `MEMSHADOW_TESTS_REQUIRE_ALL=1` (`.ci/run`) makes that a failure.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use memshadow_tests::{binary, skip, tool, TempDir};

const SYSTEM_SOCKET: &str = "/run/memshadow/memshadowd.sock";

fn root_dir() -> PathBuf {
    memshadow_tests::repo_root()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test's group and users, removed on drop.
struct Accounts {
    userdel: PathBuf,
    groupdel: PathBuf,
    users: Vec<String>,
    group: String,
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for u in &self.users {
            // --force: a process of another test may run under the same uid (one whose user
            // is gone, the uid free again); userdel would refuse, and the user stay.
            let _ = Command::new(&self.userdel).args(["--force", u]).output();
        }
        let _ = Command::new(&self.groupdel).arg(&self.group).output();
    }
}

/// What a C program sees: `memshadow_connect` with no setting, then (if it connected) an
/// attach with the strict policy, a device read, a write and a read that sees it.
const C_PROGRAM: &str = r#"
#define _DEFAULT_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <memshadow.h>

int main(void)
{
    memshadow_client *c = NULL;
    memshadow_mirror *m = NULL;
    memshadow_status s = memshadow_connect(&c);
    if (s != MEMSHADOW_OK) {
        printf("connect: %s errno %d: %s\n", memshadow_status_name(s), memshadow_last_errno(),
               memshadow_last_error());
        return 1;
    }
    size_t page = memshadow_client_page_size(c);
    unsigned char *buf = mmap(NULL, 4 * page, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        return 2;
    memset(buf, 7, 4 * page);
    const char *policy = "strict";
    s = memshadow_attach_with(c, buf, 4 * page, MEMSHADOW_POLICY_STRICT, 0, &m);
    if (s == MEMSHADOW_ERR_UNSUPPORTED) { /* no dirty tracking here: the default policy */
        policy = "default";
        s = memshadow_attach_with(c, buf, 4 * page, MEMSHADOW_POLICY_DEFAULT, 0, &m);
    }
    if (s != MEMSHADOW_OK) {
        printf("attach: %s: %s\n", memshadow_status_name(s), memshadow_last_error());
        return 1;
    }
    unsigned char b = 0;
    if (memshadow_mirror_read(m, page, &b, 1) != MEMSHADOW_OK || b != 7) {
        printf("read: %d: %s\n", b, memshadow_last_error());
        return 1;
    }
    buf[page] = 9;
    unsigned char after = 0;
    if (memshadow_mirror_read(m, page, &after, 1) != MEMSHADOW_OK) {
        printf("read after write: %s\n", memshadow_last_error());
        return 1;
    }
    printf("connected: policy %s, read 7, after a write %d\n", policy, after);
    memshadow_mirror_free(m);
    memshadow_client_free(c);
    return 0;
}
"#;

/// Runs in a mount namespace of its own: the daemon at the system socket (mode 0660, group
/// `$GROUP`), then each user's commands with no environment; every output goes to `$OUT`.
const SCENARIO: &str = r#"
set -eu
mount -t tmpfs -o mode=0755 memshadow-discovery-test /run
mkdir -m 0755 /run/memshadow
MEMSHADOW_LOG=warn "$DAEMON" --no-config --socket /run/memshadow/memshadowd.sock 2>"$OUT/daemon.log" &
daemon=$!
i=0
until "$CTL" --socket /run/memshadow/memshadowd.sock status >/dev/null 2>&1; do
  i=$((i + 1)); [ "$i" -lt 400 ] || { echo "the daemon did not start" >&2; kill "$daemon"; exit 1; }
  sleep 0.05
done
chgrp "$GROUP" /run/memshadow/memshadowd.sock
chmod 0660 /run/memshadow/memshadowd.sock
as() { # as TAG USER COMMAND...: COMMAND as USER (with the groups /etc/group gives it)
  tag=$1; user=$2; shift 2
  set +e
  "$RUNUSER" -u "$user" -- env -i PATH=/usr/bin:/bin "$@" >"$OUT/$tag.out" 2>"$OUT/$tag.err"
  echo $? >"$OUT/$tag.rc"
  set -e
}
as member-ctl "$MEMBER" "$CTL" status
as member-c "$MEMBER" "$OUT/prog"
as outsider-ctl "$OUTSIDER" "$CTL" status
as outsider-c "$OUTSIDER" "$OUT/prog"
# The member, in a process without the group (a session from before joining it).
set +e
"$SETPRIV" --reuid="$MEMBER" --regid="$(id -g "$MEMBER")" --clear-groups env -i PATH=/usr/bin:/bin "$CTL" status >"$OUT/stale-ctl.out" 2>"$OUT/stale-ctl.err"
echo $? >"$OUT/stale-ctl.rc"
set -e
kill "$daemon"
wait "$daemon" || true
"#;

#[test]
fn a_group_member_reaches_the_system_socket_with_no_setting_and_others_learn_which_group_to_join() {
    if !nix::unistd::geteuid().is_root() {
        skip("the discovery test needs root (it creates a group and users)");
        return;
    }
    let tools = [
        ("unshare", "util-linux"),
        ("runuser", "util-linux"),
        ("setpriv", "util-linux"),
        ("useradd", "passwd"),
        ("userdel", "passwd"),
        ("groupadd", "passwd"),
        ("groupdel", "passwd"),
        ("cc", "gcc"),
    ];
    let mut found = Vec::new();
    for (name, package) in tools {
        match tool(name, package) {
            Some(p) => found.push(p),
            None => return,
        }
    }
    let [unshare, runuser, setpriv, useradd, userdel, groupadd, groupdel, cc] =
        <[PathBuf; 8]>::try_from(found).unwrap();

    // The group and the users (short names: a group name is at most 32 characters).
    let tag = format!("msd{}", std::process::id() % 100_000);
    let group = format!("{tag}g");
    let member = format!("{tag}in");
    let outsider = format!("{tag}out");
    let mut accounts = Accounts {
        userdel,
        groupdel,
        users: Vec::new(),
        group: group.clone(),
    };
    // Ids from a range of their own, away from the ones other tests (and people) pick.
    let ids = [
        "-K",
        "UID_MIN=47000",
        "-K",
        "UID_MAX=47999",
        "-K",
        "GID_MIN=47000",
        "-K",
        "GID_MAX=47999",
    ];
    run(Command::new(&groupadd).args(&ids[4..]).arg(&group));
    for (user, extra) in [(&member, Some(&group)), (&outsider, None)] {
        let mut c = Command::new(&useradd);
        c.args(ids)
            .args(["--no-create-home", "--shell", "/usr/sbin/nologin"]);
        if let Some(g) = extra {
            c.args(["--groups", g]);
        }
        run(c.arg(user));
        accounts.users.push(user.clone());
    }

    // The C program, against the library of this build (as an install lays it out).
    let out = TempDir::new("discovery");
    let o = out.path();
    std::fs::set_permissions(o, std::fs::Permissions::from_mode(0o755)).unwrap();
    let built = binary("libmemshadow.so");
    let lib = o.join("lib");
    std::fs::create_dir(&lib).unwrap();
    std::os::unix::fs::symlink(&built, lib.join("libmemshadow.so.0")).unwrap();
    std::os::unix::fs::symlink("libmemshadow.so.0", lib.join("libmemshadow.so")).unwrap();
    std::fs::write(o.join("prog.c"), C_PROGRAM).unwrap();
    run(Command::new(&cc)
        .args(["-std=c99", "-Wall", "-Werror", "-o"])
        .arg(o.join("prog"))
        .arg(o.join("prog.c"))
        .arg("-I")
        .arg(root_dir().join("client-lib/include"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lmemshadow"));

    run(Command::new(&unshare)
        .args(["--mount", "--propagation", "private", "sh", "-c", SCENARIO])
        .env("DAEMON", binary("memshadowd"))
        .env("CTL", binary("memshadowctl"))
        .env("RUNUSER", &runuser)
        .env("SETPRIV", &setpriv)
        .env("GROUP", &group)
        .env("MEMBER", &member)
        .env("OUTSIDER", &outsider)
        .env("OUT", o));
    let got = |name: &str| {
        let read = |ext: &str| std::fs::read_to_string(o.join(format!("{name}.{ext}"))).unwrap();
        (
            read("rc").trim().parse::<i32>().unwrap(),
            read("out"),
            read("err"),
        )
    };

    // The member: memshadowctl and the C library find the system socket with no setting.
    let (rc, stdout, stderr) = got("member-ctl");
    assert_eq!(
        rc, 0,
        "memshadowctl status as a member of {group}: {stderr}"
    );
    assert!(
        stdout.contains(&format!("socket          {SYSTEM_SOCKET}\n")),
        "{stdout}"
    );
    let (rc, stdout, stderr) = got("member-c");
    assert_eq!(
        rc, 0,
        "the C program as a member of {group}: {stdout}{stderr}"
    );
    assert!(stdout.starts_with("connected: policy "), "{stdout}");
    if stdout.contains("policy strict") {
        assert!(stdout.contains("after a write 9"), "{stdout}");
    }

    // The outsider: told which group to join, exit 4; the C library's code and errno.
    let (rc, _, stderr) = got("outsider-ctl");
    assert_eq!(rc, 4, "memshadowctl status outside {group}: {stderr}");
    for want in [
        format!("memshadowctl: permission denied connecting to memshadowd at {SYSTEM_SOCKET}"),
        format!("admits the members of group {group}, and {outsider} is not one"),
        format!("usermod -aG {group} {outsider}"),
    ] {
        assert!(stderr.contains(&want), "{want:?} in {stderr}");
    }
    let (rc, stdout, _) = got("outsider-c");
    assert_eq!(rc, 1, "{stdout}");
    assert!(
        stdout.starts_with(&format!(
            "connect: MEMSHADOW_ERR_PERMISSION_DENIED errno {}: permission denied connecting \
             to memshadowd at {SYSTEM_SOCKET}: ",
            libc::EACCES
        )),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("group {group}")), "{stdout}");

    // The member in a process without the group: log in again.
    let (rc, _, stderr) = got("stale-ctl");
    assert_eq!(rc, 4, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{member} is one, but this session started before joining it: log in again"
        )),
        "{stderr}"
    );
    drop(accounts);
}
