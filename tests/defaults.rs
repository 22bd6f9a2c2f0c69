//! The defaults the documentation states are the daemon's: every value of the configuration
//! table of docs/operations.md, the `[default: …]` of every flag in `memshadowd --help`, the
//! numbers of the "Limits" section and the flush latency docs/design.md gives, against what
//! `memshadowd --no-config --print-config` prints (the built-in defaults, as the code has
//! them). `tests/service/config.rs` checks `systemd/memshadowd.toml` the same way.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use memshadow_tests::binary;

fn root() -> PathBuf {
    memshadow_tests::repo_root()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap()
}

/// `memshadowd` run with `args`, on its built-in defaults (no file, no environment).
fn memshadowd(args: &[&str]) -> String {
    let out = Command::new(binary("memshadowd"))
        .arg("--no-config")
        .args(args)
        .env_remove("MEMSHADOW_LOG")
        .env_remove("MEMSHADOW_SOCKET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "memshadowd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The built-in defaults, `section.key` → value (strings without their quotes).
fn defaults() -> BTreeMap<String, String> {
    let mut section = String::new();
    let mut map = BTreeMap::new();
    for line in memshadowd(&["--print-config"]).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{s}.");
            continue;
        }
        let (k, v) = line.split_once('=').unwrap();
        map.insert(
            format!("{section}{}", k.trim()),
            v.trim().trim_matches('"').to_owned(),
        );
    }
    assert!(
        map.len() > 15,
        "--print-config printed the settings: {map:?}"
    );
    map
}

/// The rows of the configuration table of docs/operations.md: key → (flag, default column).
fn doc_table() -> BTreeMap<String, (String, String)> {
    let text = read("docs/operations.md");
    let mut rows = BTreeMap::new();
    let mut in_table = false;
    for line in text.lines() {
        if line.starts_with("| key | flag | default |") {
            in_table = true;
            continue;
        }
        if in_table && !line.starts_with('|') {
            break;
        }
        if !in_table || line.starts_with("|---") {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let unquote = |s: &str| s.trim_matches('`').to_owned();
        rows.insert(unquote(cells[1]), (unquote(cells[2]), cells[3].to_owned()));
    }
    assert!(
        rows.len() > 15,
        "docs/operations.md has its configuration table"
    );
    rows
}

/// The value a default column states: its first word, without backquotes (`4 (1..=256)`,
/// `` `info` (a level, …) ``).
fn stated(default_cell: &str) -> String {
    default_cell
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_matches('`')
        .to_owned()
}

#[test]
fn the_configuration_table_states_the_daemons_defaults() {
    let code = defaults();
    let table = doc_table();
    let mut wrong = Vec::new();
    for (key, value) in &code {
        // The socket's default is a rule, not a value (the table says which).
        if key == "socket" {
            continue;
        }
        match table.get(key) {
            None => wrong.push(format!(
                "{key}: not in the table (the daemon has it: {value})"
            )),
            Some((_, cell)) if stated(cell) != *value => wrong.push(format!(
                "{key}: the table says {:?}, the daemon's default is {value:?}",
                stated(cell)
            )),
            Some(_) => {}
        }
    }
    for key in table.keys() {
        if !code.contains_key(key) {
            wrong.push(format!("{key}: in the table, unknown to --print-config"));
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/operations.md's configuration table disagrees with `memshadowd --print-config`:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_flags_help_states_the_daemons_defaults() {
    let code = defaults();
    let help = memshadowd(&["--help"]);
    // `--flag <VALUE>` then its text up to the next flag; the default in `[default: …]`.
    let mut said: BTreeMap<String, String> = BTreeMap::new();
    let mut flag: Option<String> = None;
    for line in help.lines() {
        let t = line.trim_start();
        if t.starts_with("--") {
            flag = t.split_whitespace().next().map(str::to_owned);
        }
        if let (Some(f), Some(d)) = (&flag, t.split_once("[default: ")) {
            said.insert(f.clone(), d.1.trim_end_matches(']').to_owned());
        }
    }
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (key, (flag, _)) in doc_table() {
        let (Some(value), Some(help_says)) = (code.get(&key), said.get(&flag)) else {
            continue;
        };
        if key == "socket" {
            continue;
        }
        checked += 1;
        if help_says != value {
            wrong.push(format!(
                "{flag}: --help says [default: {help_says}], the daemon's default is {value}"
            ));
        }
    }
    assert!(
        checked > 15,
        "--help states the defaults of the flags: {said:?}"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The numbers of the "Limits" section of docs/operations.md and the flush latency of
/// docs/design.md, phrase by phrase.
#[test]
fn the_limits_and_the_design_state_the_daemons_defaults() {
    let d = defaults();
    let n = |k: &str| -> u64 { d[k].parse().unwrap() };
    let ops = read("docs/operations.md");
    let limits = &ops[ops
        .find("## Limits")
        .expect("docs/operations.md has ## Limits")..];
    let design = read("docs/design.md");
    let phrases = [
        (
            limits,
            format!(
                "**Shadow memory**: {} MiB per client",
                n("quotas.shadow_mib")
            ),
        ),
        (
            limits,
            format!(
                "and {} MiB per user over all its",
                n("quotas.shadow_mib_per_uid")
            ),
        ),
        (
            limits,
            format!(
                "with {} MiB of the shadow kept",
                n("quotas.reserved_shadow_mib")
            ),
        ),
        (
            limits,
            format!(
                "**Attached address space**: {} GiB per client",
                n("quotas.attached_mib") / 1024
            ),
        ),
        (
            limits,
            format!("At most {} ranges per client", n("quotas.mirrors")),
        ),
        (
            limits,
            format!(
                "**Requests in flight**: {} per session",
                n("quotas.inflight")
            ),
        ),
        (
            limits,
            format!(
                "**Connections**: {} per user, {} in total, the last {} kept",
                n("clients_per_uid"),
                n("max_clients"),
                n("reserved_clients")
            ),
        ),
        (
            limits,
            format!(
                "must say hello within {} s",
                n("handshake_timeout_ms") / 1000
            ),
        ),
        (
            limits,
            format!("closed after {} s of silence", n("idle_timeout_s")),
        ),
        (
            &design,
            format!(
                "(`device.flush_latency_us`, {} µs by default)",
                n("device.flush_latency_us")
            ),
        ),
    ];
    let mut missing = Vec::new();
    for (text, phrase) in &phrases {
        // Markdown wraps lines: compare with runs of white space made one space.
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if !flat.contains(phrase.as_str()) {
            missing.push(phrase.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "the documentation no longer states these defaults of the daemon (fix the text, or \
         the phrase here if it was reworded):\n{}",
        missing.join("\n")
    );
}
