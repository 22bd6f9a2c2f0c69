//! memshadowd's units under a real systemd. `tests/systemd-ns/boot.sh` boots systemd as PID 1
//! of private namespaces, with overlays on /etc, /usr and /var so that nothing reaches the
//! host; the test installs memshadow there (the Debian package named by `MEMSHADOW_DEB`,
//! which `.ci/run` builds, else `systemd/install.sh --no-build` from this build) and checks
//! what only a service manager shows:
//!
//! * the package enables `memshadowd.socket` and starts nothing, also when installed with
//!   no systemd running; its C library, header and pkg-config file work together;
//! * `systemctl enable --now memshadowd.socket`; the first connection starts the service,
//!   which is active only once it sent `READY=1`, and its `STATUS=` shows in `StatusText`;
//! * the sandbox in `/proc/PID/status`: only `CAP_SYS_PTRACE`, seccomp, no-new-privileges;
//! * a member of the `memshadow` group connects (an outsider is refused), attaches, reads
//!   through the device and forks (the fork event needs `CAP_SYS_PTRACE`);
//! * `systemctl reload` changes a limit that `memshadowctl status` and a new client see;
//! * a stopped daemon is killed by the watchdog and restarted, and the client blocked in
//!   `munmap` meanwhile is released when it dies;
//! * the journal has the daemon's structured fields;
//! * with the package: `apt-get remove` stops the units and leaves only configuration,
//!   `apt-get purge` leaves nothing.
//!
//! Root only, about 30 s (20 s of it is the unit's `WatchdogSec=`). Where systemd cannot be
//! booted in namespaces (not root, no systemd, no cgroup2, namespaces or overlayfs refused)
//! the test says why on stderr (past the harness's capture), records it in the skip list
//! (`TARGET/memshadow-skips/`), and passes, unless `MEMSHADOW_TESTS_REQUIRE_ALL=1` (set by
//! `.ci/run`) makes that a failure. The namespace is powered off and its cgroup
//! removed when the test ends, also when an assertion fails.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use memshadow_tests::{bin_dir, binary, fields, skip, wait_until, TestClient};
use serde_json::Value;

const SOCKET: &str = "/run/memshadow/memshadowd.sock";
const SERVICE: &str = "memshadowd.service";
const SOCKET_UNIT: &str = "memshadowd.socket";
/// Users made inside the namespace: one in the memshadow group, one not.
const MEMBER: &str = "ms-member";
const OUTSIDER: &str = "ms-outsider";
/// Where the test client is copied inside the namespace: the group member must be able to
/// run it, which a checkout in root's home directory does not allow.
const CLIENT: &str = "/usr/local/libexec/memshadow-tests/test-client";
/// CAP_SYS_PTRACE (bit 19) alone, as /proc/PID/status prints a capability set.
const ONLY_SYS_PTRACE: &str = "0000000000080000";
const NO_CAPS: &str = "0000000000000000";
/// Generous deadline of every wait but the watchdog's.
const DEADLINE: Duration = Duration::from_secs(15);
/// The unit's WatchdogSec= (20 s) after the last ping, the restart (RestartSec=1s), slack.
const WATCHDOG_DEADLINE: Duration = Duration::from_secs(40);

fn root() -> PathBuf {
    memshadow_tests::repo_root()
}

fn recipe(script: &str) -> PathBuf {
    root().join("tests/systemd-ns").join(script)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A systemd booted by tests/systemd-ns/boot.sh; powered off (stop.sh) on drop.
struct Namespace {
    dir: PathBuf,
}

enum Boot {
    /// This machine cannot do it (boot.sh exit status 77).
    Unavailable(String),
    Failed(String),
}

impl Namespace {
    /// Boots, with `binds` kept as they are on the host.
    fn boot(binds: &[PathBuf]) -> Result<Namespace, Boot> {
        let mut cmd = Command::new(recipe("boot.sh"));
        for b in binds {
            cmd.arg("--bind").arg(b);
        }
        let out = cmd
            .output()
            .map_err(|e| Boot::Failed(format!("cannot run boot.sh: {e}")))?;
        match out.status.code() {
            Some(0) => Ok(Namespace {
                dir: PathBuf::from(text(&out.stdout).trim()),
            }),
            Some(77) => Err(Boot::Unavailable(text(&out.stderr).trim().to_owned())),
            _ => Err(Boot::Failed(format!(
                "boot.sh failed ({}):\n{}{}",
                out.status,
                text(&out.stdout),
                text(&out.stderr)
            ))),
        }
    }

    /// `args` as root inside, with no environment but PATH (tests/systemd-ns/run.sh).
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(recipe("run.sh"));
        cmd.arg(&self.dir).args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs `args`, which must succeed; their stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed ({}):\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// A property of a unit (`systemctl show -P`).
    fn show(&self, unit: &str, property: &str) -> String {
        self.ok(&["systemctl", "show", "-P", property, unit])
            .trim()
            .to_owned()
    }

    fn main_pid(&self) -> String {
        self.show(SERVICE, "MainPID")
    }

    /// `memshadowctl --json status` as root: the daemon's `info` strings.
    fn status_info(&self) -> HashMap<String, String> {
        let v: Value =
            serde_json::from_str(&self.ok(&["memshadowctl", "--json", "status"])).unwrap();
        v["info"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect()
    }

    /// A test client running as the group member, connected to the system socket.
    fn member_client(&self) -> TestClient {
        TestClient::start_command(self.command(&["runuser", "-u", MEMBER, "--", CLIENT, SOCKET]))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What systemd saw, for the failure's report (no assertion here: a panic in a
            // drop during a panic aborts).
            for args in [
                &[
                    "systemctl",
                    "status",
                    "--no-pager",
                    "--lines=0",
                    SOCKET_UNIT,
                    SERVICE,
                ][..],
                &[
                    "journalctl",
                    "--no-pager",
                    "-n",
                    "40",
                    "-u",
                    SERVICE,
                    "-u",
                    SOCKET_UNIT,
                ],
            ] {
                if let Ok(out) = self.command(args).output() {
                    eprintln!(
                        "--- {}\n{}{}",
                        args.join(" "),
                        text(&out.stdout),
                        text(&out.stderr)
                    );
                }
            }
        }
        match Command::new(recipe("stop.sh")).arg(&self.dir).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "tests/systemd-ns/stop.sh {} failed: {}",
                self.dir.display(),
                text(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run tests/systemd-ns/stop.sh: {e}"),
        }
    }
}

/// Progress, with the time since the start (shown with --nocapture, or on failure).
struct Steps(Instant);

impl Steps {
    fn step(&self, what: &str) {
        eprintln!("[{:5.1} s] {what}", self.0.elapsed().as_secs_f64());
    }
}

#[test]
fn units_under_a_real_systemd() {
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root (it boots systemd in namespaces)");
    }
    // A relative path is taken from the repository root (cargo runs this from tests/).
    let deb = std::env::var_os("MEMSHADOW_DEB").map(|d| root().join(d));
    if let Some(deb) = &deb {
        assert!(
            deb.is_file(),
            "MEMSHADOW_DEB={} is not a file",
            deb.display()
        );
    }
    // What the namespace must see as the host has it: the checkout, the build, the package.
    let mut binds = vec![root(), bin_dir().parent().unwrap().to_owned()];
    binds.extend(deb.iter().map(|d| d.parent().unwrap().to_owned()));
    let binds = binds.iter().fold(Vec::<PathBuf>::new(), |mut kept, p| {
        let p = p.canonicalize().unwrap();
        if !kept.iter().any(|k| p.starts_with(k)) {
            kept.push(p);
        }
        kept
    });

    let steps = Steps(Instant::now());
    let ns = match Namespace::boot(&binds) {
        Ok(ns) => ns,
        Err(Boot::Unavailable(why)) => {
            return skip(why.split_whitespace().collect::<Vec<_>>().join(" "))
        }
        Err(Boot::Failed(why)) => panic!("{why}"),
    };
    steps.step(&format!(
        "systemd booted in namespaces ({})",
        ns.dir.display()
    ));

    match &deb {
        Some(deb) => install_package(&ns, deb, &steps),
        None => {
            for built in ["memshadowd", "memshadowctl"] {
                binary(built);
            }
            let from = bin_dir();
            let script = root().join("systemd/install.sh");
            ns.ok(&[
                script.to_str().unwrap(),
                "--no-build",
                "--from",
                from.to_str().unwrap(),
            ]);
            steps.step(&format!(
                "installed with systemd/install.sh --no-build --from {} (MEMSHADOW_DEB names a package to test instead)",
                from.display()
            ));
        }
    }

    let pid = enable_and_activate(&ns, &steps);
    group_member_and_client(&ns, &steps);
    check_sandbox(&ns, &pid, &steps);
    reload(&ns, &pid, &steps);
    watchdog(&ns, &pid, &steps);
    journal(&ns, &steps);
    if deb.is_some() {
        remove_and_purge(&ns, &steps);
    }
    drop(ns);
    steps.step("powered off; cgroup and instance directory removed");
}

/// The package, installed as onto an image (no systemd running), then again with systemd
/// running: the socket is enabled and nothing is started, both times.
fn install_package(ns: &Namespace, deb: &Path, steps: &Steps) {
    let deb = deb.to_str().unwrap();
    let enabled_not_started = |when: &str| {
        assert_eq!(
            ns.ok(&["systemctl", "is-enabled", SOCKET_UNIT]).trim(),
            "enabled",
            "{when}: the package enables {SOCKET_UNIT}"
        );
        for unit in [SOCKET_UNIT, SERVICE] {
            assert_eq!(
                ns.show(unit, "ActiveState"),
                "inactive",
                "{when}: the package starts nothing ({unit})"
            );
        }
    };
    // A tmpfs over /run hides /run/systemd/system: the maintainer scripts see no systemd.
    ns.ok(&[
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs offline /run && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \"$0\"",
        deb,
    ]);
    // systemd learns of the new units on a daemon-reload (or the next boot).
    ns.ok(&["systemctl", "daemon-reload"]);
    enabled_not_started("installed with no systemd running");
    steps.step(&format!(
        "apt-get install {deb} with no systemd running: socket enabled, nothing started"
    ));
    ns.ok(&[
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "install",
        "-y",
        "-q",
        "--reinstall",
        deb,
    ]);
    enabled_not_started("reinstalled with systemd running");
    assert!(ns
        .ok(&["getent", "group", "memshadow"])
        .starts_with("memshadow:"));
    steps.step("apt-get install --reinstall with systemd running: the same");

    // The C library: ldconfig (the package's trigger) knows its SONAME, and a program built
    // with the header and the pkg-config file runs with it.
    let cache = ns.ok(&["ldconfig", "-p"]);
    assert!(
        cache
            .lines()
            .any(|l| l.trim_start().starts_with("libmemshadow.so.0 ")),
        "ldconfig -p has no libmemshadow.so.0:\n{cache}"
    );
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        ns.ok(&["pkg-config", "--modversion", "memshadow"]).trim(),
        version
    );
    let out = ns.ok(&[
        "sh",
        "-c",
        r#"printf '#include <memshadow.h>\n#include <stdio.h>\nint main(void) { puts(memshadow_version()); return 0; }\n' > /tmp/v.c &&
           gcc -Wall -Werror -o /tmp/v /tmp/v.c $(pkg-config --cflags --libs memshadow) && /tmp/v &&
           readlink "$(pkg-config --variable=libdir memshadow)/libmemshadow.so.0""#,
    ]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [version, &format!("libmemshadow.so.{version}")]
    );
    steps.step(
        "libmemshadow.so.0 in the ldconfig cache; a C program built with pkg-config runs with it",
    );
}

/// `systemctl enable --now memshadowd.socket`; the first connection starts the service,
/// active only after READY=1. Returns the daemon's pid (as the namespace numbers it).
fn enable_and_activate(ns: &Namespace, steps: &Steps) -> String {
    ns.ok(&["systemctl", "enable", "--now", SOCKET_UNIT]);
    assert_eq!(ns.show(SOCKET_UNIT, "ActiveState"), "active");
    assert_eq!(
        ns.show(SERVICE, "ActiveState"),
        "inactive",
        "no daemon before the first connection"
    );
    assert_eq!(
        ns.ok(&["stat", "-c", "%a %U %G", SOCKET]).trim(),
        "660 root memshadow",
        "the socket unit's SocketMode=, SocketUser=, SocketGroup="
    );
    steps.step("systemctl enable --now memshadowd.socket: listening, no daemon yet");

    // As root with no environment: the default path is the system socket.
    let status = ns.ok(&["memshadowctl", "status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("socket") && l.ends_with(SOCKET)),
        "{status}"
    );
    // Type=notify: active (running) only once the daemon sent READY=1.
    wait_until(
        "the service active after the first connection",
        DEADLINE,
        || ns.show(SERVICE, "ActiveState") == "active",
    );
    assert_eq!(ns.show(SERVICE, "SubState"), "running");
    assert_eq!(ns.show(SERVICE, "Type"), "notify");
    let status_text = ns.show(SERVICE, "StatusText");
    assert!(
        status_text.starts_with("clients=") && status_text.contains(" shadow_bytes="),
        "the daemon's STATUS= in StatusText: {status_text:?}"
    );
    let pid = ns.main_pid();
    assert_ne!(pid, "0");
    assert_eq!(
        ns.status_info()["daemon.pid"],
        pid,
        "memshadowctl talks to the service"
    );
    steps.step(&format!(
        "memshadowctl status started the service: active (READY=1), pid {pid}, StatusText={status_text:?}"
    ));
    pid
}

/// What the unit's hardening really gives the daemon, read from /proc/PID/status.
fn check_sandbox(ns: &Namespace, pid: &str, steps: &Steps) {
    let status = ns.ok(&["cat", &format!("/proc/{pid}/status")]);
    let field = |key: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status:\n{status}"))
            .trim()
            .to_owned()
    };
    assert_eq!(field("Uid").split_whitespace().next(), Some("0"));
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            field(set),
            ONLY_SYS_PTRACE,
            "{set}: CapabilityBoundingSet=CAP_SYS_PTRACE and nothing else"
        );
    }
    for set in ["CapInh", "CapAmb"] {
        assert_eq!(field(set), NO_CAPS, "{set}");
    }
    assert_eq!(field("NoNewPrivs"), "1", "NoNewPrivileges=yes");
    assert_eq!(
        field("Seccomp"),
        "2",
        "SystemCallFilter= (seccomp filter mode)"
    );
    // Seccomp 2 alone may come from MemoryDenyWriteExecute=, RestrictNamespaces= and the
    // like; the allow-list is what systemd loaded for SystemCallFilter= (expanded).
    let filter = ns.show(SERVICE, "SystemCallFilter");
    let allowed: Vec<&str> = filter.split_whitespace().collect();
    assert!(
        !allowed.is_empty() && !filter.starts_with('~'),
        "SystemCallFilter= is an allow-list: {filter:?}"
    );
    for call in ["userfaultfd", "memfd_create", "ioctl", "pread64"] {
        assert!(allowed.contains(&call), "the daemon needs {call}");
    }
    for call in ["mount", "ptrace", "kexec_load", "init_module"] {
        assert!(!allowed.contains(&call), "{call} is not allowed");
    }
    let netns = |p: &str| ns.ok(&["readlink", &format!("/proc/{p}/ns/net")]);
    assert_ne!(
        netns(pid),
        netns("1"),
        "PrivateNetwork=yes: a network namespace of its own"
    );
    steps.step(&format!(
        "sandbox: CapEff=CapPrm=CapBnd=CAP_SYS_PTRACE, NoNewPrivs 1, Seccomp 2 with an allow-list of {} calls, own netns",
        allowed.len()
    ));
}

/// A member of the memshadow group reaches the daemon (an outsider does not), and a client
/// of that user attaches, reads through the device and forks.
fn group_member_and_client(ns: &Namespace, steps: &Steps) {
    ns.ok(&[
        "useradd",
        "--no-create-home",
        "--groups",
        "memshadow",
        MEMBER,
    ]);
    ns.ok(&["useradd", "--no-create-home", OUTSIDER]);
    // No environment but PATH (run.sh): clients find the system socket by themselves.
    let status = ns.ok(&["runuser", "-u", MEMBER, "--", "memshadowctl", "status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("socket") && l.ends_with(SOCKET)),
        "{status}"
    );
    let out = ns.run(&["runuser", "-u", OUTSIDER, "--", "memshadowctl", "status"]);
    let err = text(&out.stderr);
    assert!(
        out.status.code() == Some(4)
            && err.contains("permission denied")
            && err.contains(&format!("usermod -aG memshadow {OUTSIDER}")),
        "a user outside the memshadow group is refused by the socket's mode and told which \
         group to join, exit code 4 ({}): {err}",
        out.status
    );
    steps.step(&format!(
        "{MEMBER} (group memshadow, no environment) gets the status; {OUTSIDER} is told to join the group (exit 4)"
    ));

    let client = binary("test-client");
    ns.ok(&[
        "install",
        "-D",
        "-m",
        "0755",
        client.to_str().unwrap(),
        CLIENT,
    ]);
    let mut c = ns.member_client();
    let access = fields(&c.expect_ok("access"));
    let features = u64::from_str_radix(access["features"].trim_start_matches("0x"), 16).unwrap();
    assert_ne!(
        features & (1 << 1),
        0,
        "UFFD_FEATURE_EVENT_FORK enabled (needs CAP_SYS_PTRACE): {access:?}"
    );
    c.expect_ok("map a 4");
    c.expect_ok("fill a 9");
    c.expect_ok("attach a");
    assert_eq!(fields(&c.expect_ok("read a 0 16384"))["uniform"], "9");
    wait_until("a STATUS= with the bound client", DEADLINE, || {
        ns.show(SERVICE, "StatusText").contains(" bound=1 ")
    });
    c.expect_ok("fork");
    c.expect_ok("munmap a");
    let mut stats = HashMap::new();
    wait_until("the unmap event counted", DEADLINE, || {
        stats = fields(&c.expect_ok("stats"));
        stats["events.unmap"] == "1"
    });
    assert_eq!(
        stats["events.fork"], "1",
        "the daemon saw the fork: {stats:?}"
    );
    steps.step("the member's client attached, read through the device (STATUS= bound=1), forked (fork event) and unmapped");
}

/// `systemctl reload` (SIGHUP): a lowered quotas.mirrors shows in memshadowctl status and
/// in a new client's limits; the daemon is the same process.
fn reload(ns: &Namespace, pid: &str, steps: &Steps) {
    let conf = "/etc/memshadow/memshadowd.toml";
    assert_eq!(ns.status_info()["quota.mirrors"], "256");
    ns.ok(&["sed", "-i", "s/^mirrors = 256$/mirrors = 77/", conf]);
    assert_eq!(ns.ok(&["grep", "-c", "^mirrors = 77$", conf]).trim(), "1");
    ns.ok(&["systemctl", "reload", SERVICE]);
    // ExecReload= only sends SIGHUP; the daemon applies the file right after.
    wait_until("quota.mirrors 77 in memshadowctl status", DEADLINE, || {
        ns.status_info()["quota.mirrors"] == "77"
    });
    let mut c = ns.member_client();
    assert_eq!(
        fields(&c.expect_ok("limits"))["mirrors"],
        "77",
        "a new client's limit"
    );
    assert_eq!(ns.main_pid(), pid, "a reload is not a restart");
    assert_eq!(ns.show(SERVICE, "ActiveState"), "active");
    steps.step("systemctl reload: quota.mirrors 256 -> 77 in memshadowctl status and a new client's limits, same pid");
}

/// A stopped daemon stops pinging the watchdog: systemd kills it and starts a new one. The
/// client blocked meanwhile in munmap of an attached range is released when it dies.
fn watchdog(ns: &Namespace, old: &str, steps: &Steps) {
    let restarts: u32 = ns.show(SERVICE, "NRestarts").parse().unwrap();
    let mut c = ns.member_client();
    c.expect_ok("map b 4");
    c.expect_ok("attach b");
    ns.ok(&["kill", "-STOP", old]);
    let stopped = Instant::now();
    steps.step(&format!(
        "kill -STOP {old}; a client munmaps its attached range"
    ));
    let blocked = std::thread::spawn(move || {
        let answer = c.cmd("munmap b");
        (answer, stopped.elapsed(), c)
    });
    let mut new = String::new();
    wait_until(
        "a new daemon after the watchdog's kill",
        WATCHDOG_DEADLINE,
        || {
            new = ns.main_pid();
            new != old && new != "0" && ns.show(SERVICE, "ActiveState") == "active"
        },
    );
    let (answer, blocked_for, _c) = blocked.join().unwrap();
    assert_eq!(answer, "ok", "munmap returned");
    assert!(
        blocked_for > Duration::from_secs(5),
        "munmap waited for the stopped daemon ({blocked_for:?})"
    );
    assert_eq!(
        ns.show(SERVICE, "NRestarts"),
        (restarts + 1).to_string(),
        "one restart"
    );
    let log = ns.ok(&["journalctl", "--no-pager", "-o", "cat", "-u", SERVICE]);
    assert!(log.contains("Watchdog timeout"), "{log}");
    assert!(
        !ns.run(&["kill", "-0", old]).status.success(),
        "the stopped daemon is gone"
    );
    assert_eq!(ns.status_info()["daemon.pid"], new, "the new daemon serves");
    let mut c = ns.member_client();
    c.expect_ok("map c 2");
    c.expect_ok("fill c 5");
    c.expect_ok("attach c");
    assert_eq!(fields(&c.expect_ok("read c 0 8192"))["uniform"], "5");
    steps.step(&format!(
        "watchdog: pid {old} killed after {:.1} s, munmap released with it; pid {new} serves",
        blocked_for.as_secs_f64()
    ));
}

/// The daemon logs to the journal with its structured fields (MEMSHADOW_*).
fn journal(ns: &Namespace, steps: &Steps) {
    let entries: Vec<Value> = ns
        .ok(&["journalctl", "--no-pager", "-o", "json", "-u", SERVICE])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let daemon = |message: &str| -> Vec<&Value> {
        entries
            .iter()
            .filter(|e| e["SYSLOG_IDENTIFIER"] == "memshadowd" && e["MESSAGE"] == message)
            .collect()
    };
    let listening = daemon("memshadowd listening");
    assert_eq!(
        listening.len(),
        2,
        "one per daemon (before and after the watchdog)"
    );
    for e in listening {
        assert_eq!(e["_SYSTEMD_UNIT"], SERVICE);
        assert_eq!(e["MEMSHADOW_ACTIVATED"], "true", "socket-activated: {e}");
        assert_eq!(e["MEMSHADOW_SOCKET"], SOCKET, "{e}");
        assert_eq!(e["TARGET"], "memshadow_daemon::server", "{e}");
    }
    let uid = ns.ok(&["id", "-u", MEMBER]).trim().to_owned();
    let bound = daemon("client bound");
    assert!(
        bound
            .iter()
            .any(|e| e["MEMSHADOW_UID"] == uid.as_str() && e["MEMSHADOW_CLIENT"].is_string()),
        "a `client bound` entry with MEMSHADOW_CLIENT and MEMSHADOW_UID={uid}: {bound:?}"
    );
    assert!(!daemon("configuration reloaded").is_empty());
    steps.step("journal: MEMSHADOW_ACTIVATED, MEMSHADOW_SOCKET, MEMSHADOW_CLIENT, MEMSHADOW_UID fields present");
}

/// `apt-get remove` stops the units and removes every file but the configuration;
/// `apt-get purge` leaves nothing of memshadow.
fn remove_and_purge(ns: &Namespace, steps: &Steps) {
    let files: Vec<String> = ns
        .ok(&["dpkg", "-L", "memshadow"])
        .lines()
        .map(str::to_owned)
        .collect();
    let conffiles = ["/etc/memshadow/memshadowd.toml"];
    ns.ok(&[
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "remove",
        "-y",
        "-q",
        "memshadow",
    ]);
    for unit in [SOCKET_UNIT, SERVICE] {
        assert_eq!(
            ns.show(unit, "ActiveState"),
            "inactive",
            "{unit} stopped on removal"
        );
    }
    let exists = |path: &str| {
        ns.run(&["test", "-e", path, "-o", "-L", path])
            .status
            .success()
    };
    assert!(
        !exists("/run/memshadow"),
        "the socket and its directory are gone"
    );
    let is_dir = |path: &str| ns.run(&["test", "-d", path]).status.success();
    let left: Vec<&String> = files
        .iter()
        .filter(|f| !conffiles.contains(&f.as_str()) && exists(f) && !is_dir(f))
        .collect();
    assert!(
        left.is_empty(),
        "apt-get remove left package files: {left:?}"
    );
    for f in conffiles {
        assert!(exists(f), "the configuration stays until purge: {f}");
    }
    steps.step(&format!(
        "apt-get remove: units stopped, all {} packaged paths gone but the configuration",
        files.len()
    ));

    ns.ok(&[
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "purge",
        "-y",
        "-q",
        "memshadow",
    ]);
    assert!(!ns.run(&["dpkg", "-s", "memshadow"]).status.success());
    // Everything named memshadow but the test's own client and the namespace's journald
    // settings.
    let found = ns.ok(&[
        "find",
        "/etc",
        "/usr",
        "/var",
        "/run",
        "(",
        "-path",
        "/usr/local/libexec/memshadow-tests",
        "-o",
        "-path",
        "/etc/systemd/journald.conf.d/memshadow-ns.conf",
        ")",
        "-prune",
        "-o",
        "-name",
        "*memshadow*",
        "-print",
    ]);
    assert_eq!(found.trim(), "", "apt-get purge left these");
    steps.step("apt-get purge: nothing named memshadow left in /etc, /usr, /var, /run");
}
