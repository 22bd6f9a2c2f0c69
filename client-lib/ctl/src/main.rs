//! `memshadowctl`: pokes memshadowd from the shell. A thin front end over the client
//! library's control API (no protocol code of its own).
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 3 daemon unreachable, 4 permission denied.
//!
//! Everything the daemon says is untrusted text (a client's process name is whatever that
//! client chose): table output and error messages show it through [`esc`], so no control
//! character or bidirectional override reaches the operator's terminal raw, and the text
//! output as a whole passes [`text_out`]; JSON output is escaped by serde, and [`json_out`]
//! spells the few characters serde leaves raw (DEL, C1 controls, bidi overrides) as `\uXXXX`.

#![allow(clippy::print_stdout)]

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use memshadow::{
    event_bit, AckRecord, ClientInfo, Control, EngineInfo, Error, EventKind, InvalidationReport,
    MirrorInfo, Status, Target, TraceItem, TRACE_ENGINE_ACKS,
};
use serde_json::{json, Value};

/// Pokes memshadowd: status, clients, mirrors, external engines, counters, a live trace of
/// invalidations, device reads of a client's shadow and injected invalidations.
///
/// Exit codes: 0 ok, 1 error, 2 usage, 3 daemon unreachable, 4 permission denied.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Daemon socket [default: $MEMSHADOW_SOCKET, else /run/memshadow/memshadowd.sock if it
    /// exists, else $XDG_RUNTIME_DIR/memshadow/memshadowd.sock]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print JSON instead of tables (one object per line for `trace`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Daemon version, protocol, uptime, socket, device settings, clients and totals.
    Status,
    /// One row per connected client (root or the daemon's owner only).
    Clients,
    /// Attached ranges and their notifiers (every client's, or one pid's).
    Mirrors {
        /// Only this client.
        #[arg(long)]
        pid: Option<i32>,
    },
    /// External engines: who reads which client's mirror, their flush rings and
    /// acknowledgement times (root or the daemon's owner only).
    Engines {
        /// Only the engines of this client.
        #[arg(long)]
        pid: Option<i32>,
    },
    /// Every counter of the daemon.
    Stats,
    /// A live stream of invalidations, until interrupted (or `--count` records).
    Trace {
        /// Only this client.
        #[arg(long)]
        pid: Option<i32>,
        /// Only these kinds (repeatable): unmap, clear, protection-vma, protection-page,
        /// soft-dirty, release, and engine-ack (an external engine's acknowledgement that
        /// a finish waited for). Without it: all of them.
        #[arg(long = "event", value_parser = parse_trace_kind)]
        events: Vec<u32>,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
    },
    /// A device read of a client's shadow at ADDR (root or the daemon's owner only).
    Peek {
        /// The client.
        #[arg(long)]
        pid: i32,
        /// Client virtual address (0x… or decimal).
        #[arg(value_parser = parse_num)]
        addr: u64,
        /// Bytes (decimal, 0x…, or with K/M suffix).
        #[arg(value_parser = parse_num)]
        len: u64,
        /// Hex dump (the default).
        #[arg(long, conflicts_with = "raw")]
        hex: bool,
        /// The bytes as they are, to stdout.
        #[arg(long)]
        raw: bool,
    },
    /// Collects a client's written pages now (dirty tracking) and invalidates them.
    Sync {
        /// The client.
        #[arg(long)]
        pid: i32,
    },
    /// Injects an invalidation of a client's range and prints what it did.
    Invalidate {
        /// The client.
        #[arg(long)]
        pid: i32,
        /// First byte (rounded down to a page).
        #[arg(value_parser = parse_num)]
        addr: u64,
        /// Length (rounded up to pages).
        #[arg(value_parser = parse_num)]
        len: u64,
        /// The kind reported to notifiers.
        #[arg(long, default_value = "clear", value_parser = parse_event)]
        event: EventKind,
        /// Refuse (EAGAIN) rather than wait for a TLB flush.
        #[arg(long)]
        non_blocking: bool,
    },
}

/// Documented exit codes.
mod exit {
    pub const ERROR: u8 = 1;
    pub const UNREACHABLE: u8 = 3;
    pub const DENIED: u8 = 4;
}

fn parse_event(s: &str) -> Result<EventKind, String> {
    EventKind::parse(s).ok_or_else(|| {
        let names: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown event {s:?} (one of {})", names.join(", "))
    })
}

/// The trace mask bit of an event name or `engine-ack`.
fn parse_trace_kind(s: &str) -> Result<u32, String> {
    if s == ENGINE_ACK {
        return Ok(TRACE_ENGINE_ACKS);
    }
    parse_event(s)
        .map(event_bit)
        .map_err(|e| format!("{e}, or {ENGINE_ACK}"))
}

/// The name of acknowledgement records in `trace`.
const ENGINE_ACK: &str = "engine-ack";

/// `4096`, `0x1000`, `4K`, `2M`, `1G`.
fn parse_num(s: &str) -> Result<u64, String> {
    let bad = || format!("not a number: {s:?}");
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(&h.replace('_', ""), 16).map_err(|_| bad());
    }
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// The exit code for a library error.
fn code_of(e: &Error) -> u8 {
    match e {
        Error::Connect { .. } | Error::DaemonGone | Error::NoSocketPath => exit::UNREACHABLE,
        Error::PermissionDenied(_) | Error::ConnectDenied { .. } => exit::DENIED,
        _ => exit::ERROR,
    }
}

/// Characters shown as an escape rather than as they are: control characters (C0, DEL and
/// C1: cursor movement, colours, title changes, 8-bit CSI), the Unicode line and paragraph
/// separators, and the bidirectional formatting characters (which reorder what follows on
/// the line, so a name could pass for another).
fn unsafe_for_terminal(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// Text from the daemon, safe to print: the characters of [`unsafe_for_terminal`] become
/// visible escapes (`\n`, `\t`, `\r`, `\x1b`, `\u{202e}`) and a backslash is doubled, so an
/// escape on screen never is text that merely looks like one. Everything else (non-ASCII
/// letters included) is kept as it is.
fn esc(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c == '\\' || unsafe_for_terminal(c)) {
        return Cow::Borrowed(s);
    }
    let mut o = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            '\r' => o.push_str("\\r"),
            c if unsafe_for_terminal(c) => push_escape(&mut o, c),
            c => o.push(c),
        }
    }
    Cow::Owned(o)
}

/// `\xNN` for ASCII, `\u{NNNN}` beyond.
fn push_escape(o: &mut String, c: char) {
    let _ = if c.is_ascii() {
        write!(o, "\\x{:02x}", u32::from(c))
    } else {
        write!(o, "\\u{{{:x}}}", u32::from(c))
    };
}

/// The last guard of text output: whatever still holds a character of
/// [`unsafe_for_terminal`] other than the line breaks of the tables themselves has it
/// escaped (every daemon string is already shown through [`esc`]; this is for one that
/// was missed).
fn text_out(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && unsafe_for_terminal(c)) {
        return Cow::Borrowed(s);
    }
    let mut o = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if c != '\n' && unsafe_for_terminal(c) {
            push_escape(&mut o, c);
        } else {
            o.push(c);
        }
    }
    Cow::Owned(o)
}

/// One JSON value on a line. serde escapes quotes, backslashes and C0 controls; DEL, C1
/// controls and the other characters of [`unsafe_for_terminal`] it writes raw, so they are
/// spelt `\uXXXX` here (they can only be inside strings, where that is the same text).
fn json_out(v: &Value) -> String {
    let mut o = String::new();
    for c in v.to_string().chars() {
        if unsafe_for_terminal(c) {
            let _ = write!(o, "\\u{:04x}", u32::from(c));
        } else {
            o.push(c);
        }
    }
    o.push('\n');
    o
}

/// The line printed for an error: its causes on one line, daemon text escaped.
fn error_line(e: &Error) -> String {
    format!("memshadowctl: {}", esc(&memshadow::error_chain(e)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = match cli.socket.as_deref() {
        Some(p) => Control::connect_to(p),
        None => Control::connect(),
    };
    let r = client.and_then(|c| run(&c, &cli));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_line(&e));
            ExitCode::from(code_of(&e))
        }
    }
}

/// Prints table output (through [`text_out`]).
fn out(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text_out(s).as_bytes());
}

/// Prints one JSON value on a line (through [`json_out`]).
fn out_json(v: &Value) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(json_out(v).as_bytes());
}

/// Prints `json()` (with `--json`) or `text()`.
fn show(json: bool, as_json: impl FnOnce() -> Value, as_text: impl FnOnce() -> String) {
    if json {
        out_json(&as_json());
    } else {
        out(&as_text());
    }
}

/// Runs the subcommand: one function per command, each asks the daemon and prints.
fn run(c: &Control, cli: &Cli) -> Result<(), Error> {
    let json = cli.json;
    match &cli.cmd {
        Cmd::Status => status(c, json),
        Cmd::Clients => clients(c, json),
        Cmd::Mirrors { pid } => mirrors(c, *pid, json),
        Cmd::Engines { pid } => engines(c, *pid, json),
        Cmd::Stats => stats(c, json),
        Cmd::Trace { pid, events, count } => trace(c, *pid, events, *count, json),
        Cmd::Peek {
            pid,
            addr,
            len,
            hex: _,
            raw,
        } => peek(c, *pid, *addr, *len, *raw, json),
        Cmd::Sync { pid } => sync(c, *pid, json),
        Cmd::Invalidate {
            pid,
            addr,
            len,
            event,
            non_blocking,
        } => {
            let r = c.invalidate(*pid, *addr, *len, *event, *non_blocking)?;
            show(
                json,
                || report_json(&r),
                || invalidate_text(&r, *non_blocking),
            );
            Ok(())
        }
    }
}

fn status(c: &Control, json: bool) -> Result<(), Error> {
    let st = c.status()?;
    show(
        json,
        || status_json(&st),
        || status_text(&st, c.page_size() as u64),
    );
    Ok(())
}

fn clients(c: &Control, json: bool) -> Result<(), Error> {
    let list = c.list_clients()?;
    show(
        json,
        || Value::Array(list.iter().map(client_json).collect()),
        || clients_text(&list),
    );
    Ok(())
}

fn mirrors(c: &Control, pid: Option<i32>, json: bool) -> Result<(), Error> {
    let list = c.list_mirrors(pid.map_or(Target::All, Target::Pid))?;
    show(
        json,
        || Value::Array(list.iter().map(mirror_json).collect()),
        || mirrors_text(&list),
    );
    Ok(())
}

fn engines(c: &Control, pid: Option<i32>, json: bool) -> Result<(), Error> {
    let list = c.engines(pid.map_or(Target::All, Target::Pid))?;
    show(
        json,
        || Value::Array(list.iter().map(engine_json).collect()),
        || engines_text(&list),
    );
    Ok(())
}

fn stats(c: &Control, json: bool) -> Result<(), Error> {
    let mut counters = c.status()?.counters;
    counters.sort();
    show(
        json,
        || {
            Value::Object(
                counters
                    .iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect(),
            )
        },
        || stats_text(&counters),
    );
    Ok(())
}

/// Streams trace records until `count` were printed or stdout is closed.
fn trace(
    c: &Control,
    pid: Option<i32>,
    events: &[u32],
    count: Option<u64>,
    json: bool,
) -> Result<(), Error> {
    let mask = events.iter().fold(0, |m, bit| m | bit);
    let mut trace = c.trace(pid.map_or(Target::All, Target::Pid), mask)?;
    if !json {
        out(&format!(
            "{:<15} {:>7} {:<10} {:<31} {:>5} {:>10} {:>10} {:>7}\n",
            "TIME", "PID", "EVENT", "RANGE", "NOTIF", "START", "FINISH", "FLUSHES"
        ));
    }
    let mut seen = 0u64;
    while count.is_none_or(|n| seen < n) {
        let item = trace.next_item()?;
        seen += 1;
        let line = match &item {
            TraceItem::Invalidation(rec) => trace_line(rec, json),
            TraceItem::Ack(ack) => ack_line(ack, json),
        };
        let mut o = std::io::stdout().lock();
        if o.write_all(line.as_bytes())
            .and_then(|()| o.flush())
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// One trace record as a line of JSON or of the table.
fn trace_line(rec: &memshadow::TraceRecord, json: bool) -> String {
    if json {
        let mut v = report_json(&rec.report);
        v["dropped"] = json!(rec.dropped);
        v["time"] = json!(unix_now());
        return json_out(&v);
    }
    with_lost(trace_text(&rec.report), rec.dropped)
}

/// One acknowledgement record as a line of JSON or of the table: the engine, in the range
/// column, and the time the finish waited for it, in the finish column.
fn ack_line(rec: &AckRecord, json: bool) -> String {
    let a = &rec.ack;
    if json {
        return json_out(&json!({
            "pid": a.pid, "event": ENGINE_ACK, "engine_id": a.engine_id,
            "engine_pid": a.engine_pid, "seq": a.seq, "wait_ns": a.wait_ns,
            "outcome": a.outcome.as_str(), "dropped": rec.dropped, "time": unix_now(),
        }));
    }
    let l = format!(
        "{:<15} {:>7} {:<10} {:<31} {:>5} {:>10} {:>10} {}",
        clock(),
        a.pid,
        ENGINE_ACK,
        format!(
            "engine {} (pid {}) seq {}",
            a.engine_id, a.engine_pid, a.seq
        ),
        "",
        "",
        micros(a.wait_ns),
        a.outcome.as_str()
    );
    with_lost(l, rec.dropped)
}

/// A table line, with how many records were lost before it, ready to print.
fn with_lost(mut l: String, dropped: u64) -> String {
    if dropped > 0 {
        l.push_str(&format!("  ({dropped} lost before this)"));
    }
    l.push('\n');
    text_out(&l).into_owned()
}

fn peek(c: &Control, pid: i32, addr: u64, len: u64, raw: bool, json: bool) -> Result<(), Error> {
    let bytes = c.peek(pid, addr, len)?;
    if raw {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(&bytes).and_then(|()| o.flush());
        return Ok(());
    }
    show(
        json,
        || {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            json!({"pid": pid, "addr": addr, "len": bytes.len(), "hex": hex})
        },
        || hexdump(addr, &bytes),
    );
    Ok(())
}

fn sync(c: &Control, pid: i32, json: bool) -> Result<(), Error> {
    let r = c.sync_pid(pid)?;
    show(
        json,
        || {
            json!({
                "pid": pid, "backend": r.backend.as_str(), "mirrors": r.mirrors,
                "pages_scanned": r.pages_scanned, "pages_dirty": r.pages_dirty,
                "regions": r.regions, "scan_ns": r.scan_ns,
                "invalidate_ns": r.invalidate_ns,
            })
        },
        || {
            format!(
                "synced pid {pid} ({}): {} mirror(s), {} page(s) scanned, {} written in {} \
                 run(s) invalidated; scan {}, invalidation {}\n",
                r.backend.as_str(),
                r.mirrors,
                r.pages_scanned,
                r.pages_dirty,
                r.regions,
                micros(r.scan_ns),
                micros(r.invalidate_ns)
            )
        },
    );
    Ok(())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn status_json(st: &Status) -> Value {
    let info: serde_json::Map<String, Value> =
        st.info.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let counters: serde_json::Map<String, Value> = st
        .counters
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({"info": info, "counters": counters})
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m {:02}s", s / 3600, s / 60 % 60, s % 60),
    }
}

fn micros(ns: u64) -> String {
    format!("{:.1}us", ns as f64 / 1000.0)
}

/// `memshadowctl status` as a table: who the daemon is, its device, how it reads and
/// tracks memory, who is connected, what it has done.
fn status_text(st: &Status, page: u64) -> String {
    let mut rows = identity_rows(st);
    rows.extend(device_rows(st, page));
    rows.extend(dirty_rows(st));
    rows.push(("clients", clients_row(st)));
    rows.extend(totals_rows(st));
    let mut s = String::new();
    for (k, v) in rows {
        s.push_str(&format!("{k:<15} {v}\n"));
    }
    s
}

/// Daemon text of the status, escaped.
fn info(st: &Status, k: &str) -> String {
    esc(st.info(k).unwrap_or("?")).into_owned()
}

fn identity_rows(st: &Status) -> Vec<(&'static str, String)> {
    let i = |k: &str| info(st, k);
    vec![
        (
            "daemon",
            format!(
                "memshadowd {} (pid {}, uid {})",
                i("daemon.version"),
                i("daemon.pid"),
                i("daemon.uid")
            ),
        ),
        (
            "protocol",
            format!(
                "{} (daemon speaks {})",
                i("protocol.version"),
                i("protocol.supported")
            ),
        ),
        (
            "uptime",
            duration(Duration::from_millis(
                st.counter("server.uptime_ms").unwrap_or(0),
            )),
        ),
        ("socket", i("socket")),
    ]
}

fn device_rows(st: &Status, page: u64) -> Vec<(&'static str, String)> {
    let i = |k: &str| info(st, k);
    vec![
        (
            "device",
            format!(
                "{} engines, flush latency {} us, {} invalidation",
                i("device.engines"),
                i("device.flush_latency_us"),
                i("device.mode")
            ),
        ),
        (
            "shadow",
            format!(
                "{} in use of {} MiB",
                bytes(st.counter("shadow.slots_in_use").unwrap_or(0) * page),
                i("device.shadow_mib")
            ),
        ),
        ("memory access", memory_access(st.info("access.path"))),
    ]
}

fn totals_rows(st: &Status) -> Vec<(&'static str, String)> {
    let n = |k: &str| st.counter(k).unwrap_or(0);
    let inv: u64 = st
        .counters
        .iter()
        .filter(|(k, _)| k.starts_with("device.inv_"))
        .map(|(_, v)| v)
        .sum();
    vec![
        (
            "totals",
            format!(
                "{} uffd events, {} invalidations, {} faults, {} device reads",
                n("events.total"),
                inv,
                n("device.faults"),
                n("device.reads")
            ),
        ),
        (
            "",
            format!(
                "{} TLB flushes queued, {} coalesced, {} executed",
                n("device.flushes_queued"),
                n("device.flushes_coalesced"),
                n("device.flushes_executed")
            ),
        ),
    ]
}

/// How the daemon reads client memory (`access.path`).
fn memory_access(path: Option<&str>) -> String {
    match path {
        Some("mem-fd") => {
            "through each client's own /proc/self/mem, handed over when it binds (mem-fd)".into()
        }
        Some(other) => esc(other).into_owned(),
        None => "?".into(),
    }
}

/// When a collection policy collects written pages.
fn policy_text(policy: &str) -> String {
    match policy {
        "manual" => "manual (written pages are collected on sync)".into(),
        "strict" => "strict (each device read collects the pages it reads first)".into(),
        p => match p.strip_prefix("periodic=") {
            Some(ms) => format!(
                "periodic (written pages are collected every {} ms)",
                esc(ms)
            ),
            None => esc(p).into_owned(),
        },
    }
}

/// `dirty tracking`: the back end in use and why, the policy of a plain attach, and why each
/// other back end is not used. `off` is listed only when it is what is used: beside a back end
/// that works it is no alternative anyone would look for.
fn dirty_rows(st: &Status) -> Vec<(&'static str, String)> {
    let i = |k: &str| esc(st.info(k).unwrap_or("?")).into_owned();
    let policy = format!(
        "policy of a plain attach: {}; attach_with picks one per range",
        policy_text(st.info("dirty.policy").unwrap_or("?"))
    );
    let Some(backend) = st.info("dirty.backend") else {
        // A daemon that does not say which back end it chose.
        return vec![(
            "dirty tracking",
            format!("{}, {policy}", i("dirty.tracking")),
        )];
    };
    let requested = st.info("dirty.requested").unwrap_or("?");
    let (b, r) = (esc(backend), esc(requested));
    let first = match (backend, requested) {
        ("off", "off") => {
            "off (--dirty-tracking off): the shadow follows mappings, not writes".into()
        }
        ("off", _) => format!(
            "off: no back end works here (--dirty-tracking {r}): the shadow follows mappings, not \
             writes"
        ),
        (_, "auto") => format!("{b}, the first back end that works here (--dirty-tracking auto)"),
        _ => format!("{b} (--dirty-tracking {r})"),
    };
    let mut rows = vec![("dirty tracking", first), ("", policy)];
    for (k, v) in &st.info {
        let Some(name) = k.strip_prefix("dirty.refused.") else {
            continue;
        };
        if name == "off" && backend != "off" {
            continue;
        }
        rows.push(("", format!("{} not used: {}", esc(name), esc(v))));
    }
    rows
}

/// `clients`: who the connections are.
fn clients_row(st: &Status) -> String {
    let n = |k: &str| st.counter(k).unwrap_or(0);
    let total = n("server.clients");
    let count = |k: &str| st.info(k).and_then(|v| v.parse::<u64>().ok());
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let (Some(bound), Some(tracing), Some(control), Some(handshake)) = (
        count("sessions.bound"),
        count("sessions.tracing"),
        count("sessions.control"),
        count("sessions.handshake"),
    ) else {
        // A daemon that does not break them down.
        let bound = n("server.clients_bound");
        return format!(
            "{total} connected: {} (they mirror their memory), {} (control sessions and \
             traces, this memshadowctl among them)",
            plural(bound, "bound client", "bound clients"),
            plural(total.saturating_sub(bound), "other", "others")
        );
    };
    let mut parts = vec![format!(
        "{} (mirroring memory)",
        plural(bound, "bound client", "bound clients")
    )];
    if tracing > 0 {
        parts.push(plural(tracing, "trace stream", "trace streams"));
    }
    if control > 0 {
        let who = if control == 1 {
            "this memshadowctl"
        } else {
            "this memshadowctl among them"
        };
        parts.push(format!(
            "{} ({who})",
            plural(control, "control session", "control sessions")
        ));
    }
    if handshake > 0 {
        parts.push(format!(
            "{} still saying hello",
            plural(handshake, "connection", "connections")
        ));
    }
    format!("{total} connected: {}", parts.join(", "))
}

/// `name  value` lines, names (daemon text, escaped) aligned.
fn stats_text(counters: &[(String, u64)]) -> String {
    let names: Vec<Cow<'_, str>> = counters.iter().map(|(k, _)| esc(k)).collect();
    let w = names.iter().map(|k| k.chars().count()).max().unwrap_or(0);
    let mut s = String::new();
    for (k, (_, v)) in names.iter().zip(counters) {
        s.push_str(&format!("{k:<w$}  {v}\n"));
    }
    s
}

fn client_json(c: &ClientInfo) -> Value {
    json!({
        "id": c.id, "pid": c.pid, "uid": c.uid, "comm": c.comm, "bound": c.bound,
        "ranges": c.mirrors, "shadow_bytes": c.shadow_bytes, "faults": c.faults,
        "invalidations": c.invalidations, "events": c.events,
    })
}

fn clients_text(list: &[ClientInfo]) -> String {
    let mut s = format!(
        "{:>7} {:>6} {:<16} {:>6} {:>10} {:>8} {:>13} {:>8}\n",
        "PID", "UID", "COMMAND", "RANGES", "SHADOW", "FAULTS", "INVALIDATIONS", "EVENTS"
    );
    for c in list {
        s.push_str(&format!(
            "{:>7} {:>6} {:<16} {:>6} {:>10} {:>8} {:>13} {:>8}\n",
            c.pid,
            c.uid,
            if c.comm.is_empty() {
                "?".into()
            } else {
                esc(&c.comm)
            },
            if c.bound {
                c.mirrors.to_string()
            } else {
                "-".into()
            },
            bytes(c.shadow_bytes),
            c.faults,
            c.invalidations,
            c.events
        ));
    }
    s
}

fn mirror_json(m: &MirrorInfo) -> Value {
    json!({
        "pid": m.pid, "id": m.id, "addr": m.addr, "len": m.len, "pages": m.pages,
        "seq": m.seq, "state": m.state,
    })
}

fn mirrors_text(list: &[MirrorInfo]) -> String {
    let mut s = format!(
        "{:>7} {:>4} {:<33} {:>10} {:>7} {:>8}  {}\n",
        "PID", "ID", "RANGE", "SIZE", "PAGES", "SEQ", "STATE"
    );
    for m in list {
        s.push_str(&format!(
            "{:>7} {:>4} {:<33} {:>10} {:>7} {:>8}  {}\n",
            m.pid,
            m.id,
            format!("{:#x}-{:#x}", m.addr, m.addr + m.len),
            bytes(m.len),
            m.pages,
            m.seq,
            esc(&m.state)
        ));
    }
    s
}

fn engine_json(e: &EngineInfo) -> Value {
    json!({
        "id": e.id, "pid": e.pid, "client_pid": e.client_pid, "mirror_id": e.mirror_id,
        "flushes": e.flushes, "depth": e.depth, "tlb_entries": e.tlb_entries, "acks": e.acks,
        "ack_p50_us": e.ack_p50_us, "ack_p99_us": e.ack_p99_us, "overflows": e.overflows,
        "faults": e.faults, "writes": e.writes, "state": e.state,
    })
}

/// One row per engine. `TLB` is what the engine says its TLB holds (a word of its ring it
/// writes itself, as of its last acknowledgement or fault): informational, like its state.
fn engines_text(list: &[EngineInfo]) -> String {
    let row = |c: [&str; 14]| {
        format!(
            "{:>4} {:>7} {:>7} {:>6} {:>8} {:>5} {:>6} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7}  {}\n",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13]
        )
    };
    let mut s = row([
        "ID",
        "PID",
        "CLIENT",
        "MIRROR",
        "FLUSHES",
        "DEPTH",
        "TLB",
        "ACKS",
        "ACK P50",
        "ACK P99",
        "OVERFLOWS",
        "FAULTS",
        "WRITES",
        "STATE",
    ]);
    for e in list {
        let n = [
            e.id.to_string(),
            e.pid.to_string(),
            e.client_pid.to_string(),
            e.mirror_id.to_string(),
            e.flushes.to_string(),
            e.depth.to_string(),
            e.tlb_entries.to_string(),
            e.acks.to_string(),
            format!("{}us", e.ack_p50_us),
            format!("{}us", e.ack_p99_us),
            e.overflows.to_string(),
            e.faults.to_string(),
            e.writes.to_string(),
        ];
        let state = esc(&e.state);
        s.push_str(&row([
            &n[0], &n[1], &n[2], &n[3], &n[4], &n[5], &n[6], &n[7], &n[8], &n[9], &n[10], &n[11],
            &n[12], &state,
        ]));
    }
    s
}

fn report_json(r: &InvalidationReport) -> Value {
    json!({
        "pid": r.pid, "event": r.event.as_str(), "start": r.start, "end": r.end,
        "notifiers": r.notifiers, "would_block": r.would_block, "start_ns": r.start_ns,
        "finish_ns": r.finish_ns, "flushes_queued": r.flushes_queued,
        "flushes_coalesced": r.flushes_coalesced,
    })
}

fn clock() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let s = t.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        t.subsec_micros()
    )
}

fn trace_text(r: &InvalidationReport) -> String {
    let mut l = format!(
        "{:<15} {:>7} {:<10} {:<31} {:>5} {:>10} {:>10} {:>3}/{:<3}",
        clock(),
        r.pid,
        r.event.as_str(),
        format!("{:#x}-{:#x}", r.start, r.end),
        r.notifiers,
        micros(r.start_ns),
        micros(r.finish_ns),
        r.flushes_queued,
        r.flushes_coalesced
    );
    if r.would_block {
        l.push_str("  EAGAIN");
    }
    l
}

fn invalidate_text(r: &InvalidationReport, non_blocking: bool) -> String {
    let what = format!(
        "{} of {:#x}-{:#x} ({}) in pid {}",
        r.event.as_str(),
        r.start,
        r.end,
        bytes(r.end - r.start),
        r.pid
    );
    let mut s = if r.would_block {
        format!(
            "EAGAIN: the non-blocking {what} was refused: a notifier would have to wait for a \
             TLB flush\n"
        )
    } else {
        format!(
            "invalidated: {what}{}\n",
            if non_blocking { " (non-blocking)" } else { "" }
        )
    };
    s.push_str(&format!(
        "  notifiers hit {}, start pass {}, finish pass {}, TLB flushes queued {}, coalesced {}\n",
        r.notifiers,
        micros(r.start_ns),
        micros(r.finish_ns),
        r.flushes_queued,
        r.flushes_coalesced
    ));
    s
}

/// 16 bytes a line, addressed by client virtual address.
fn hexdump(addr: u64, b: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in b.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|x| format!("{x:02x}")).collect();
        let text: String = chunk
            .iter()
            .map(|&x| {
                if x.is_ascii_graphic() || x == b' ' {
                    x as char
                } else {
                    '.'
                }
            })
            .collect();
        s.push_str(&format!(
            "{:016x}  {:<47}  |{}|\n",
            addr + 16 * i as u64,
            hex.join(" "),
            text
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_with_bases_and_suffixes() {
        assert_eq!(parse_num("4096"), Ok(4096));
        assert_eq!(parse_num("0x1000"), Ok(4096));
        assert_eq!(parse_num("4K"), Ok(4096));
        assert_eq!(parse_num("2m"), Ok(2 << 20));
        assert!(parse_num("x").is_err());
        assert!(parse_num("99999999999G").is_err());
    }

    #[test]
    fn exit_codes_follow_the_documented_table() {
        assert_eq!(code_of(&Error::DaemonGone), exit::UNREACHABLE);
        assert_eq!(code_of(&Error::PermissionDenied("x".into())), exit::DENIED);
        let denied = Error::ConnectDenied {
            path: "/run/memshadow/memshadowd.sock".into(),
            hint: "join group memshadow".into(),
            errno: nix::Error::EACCES,
        };
        assert_eq!(
            code_of(&denied),
            exit::DENIED,
            "a socket that refuses this user"
        );
        let gone = Error::Connect {
            path: "/x".into(),
            source: nix::Error::ENOENT,
        };
        assert_eq!(code_of(&gone), exit::UNREACHABLE);
        assert_eq!(code_of(&Error::NoSocketPath), exit::UNREACHABLE);
        assert_eq!(code_of(&Error::BadRange("x".into())), exit::ERROR);
    }

    /// A character a terminal would act on rather than show.
    fn raw_control(s: &str) -> Option<char> {
        s.chars().find(|&c| c != '\n' && unsafe_for_terminal(c))
    }

    /// What an attacker would put in its process name: clear the screen, set the title,
    /// a fake row on a new line, an 8-bit CSI, a right-to-left override.
    const EVIL: &str = "x\x1b[2J\x1b]0;pwn\x07\n    1      0 init\t\r\x7f\u{9b}31m\u{202e}gpj";

    fn client(comm: &str) -> ClientInfo {
        ClientInfo {
            id: 1,
            pid: 4242,
            uid: 1000,
            bound: true,
            mirrors: 1,
            shadow_bytes: 4096,
            events: 0,
            comm: comm.into(),
            faults: 0,
            invalidations: 0,
        }
    }

    #[test]
    fn esc_makes_controls_visible_and_keeps_unicode_text() {
        assert_eq!(
            esc(EVIL),
            "x\\x1b[2J\\x1b]0;pwn\\x07\\n    1      0 init\\t\\r\\x7f\\u{9b}31m\\u{202e}gpj"
        );
        assert_eq!(esc("\0\u{2028}\u{2066}"), "\\x00\\u{2028}\\u{2066}");
        // A backslash is doubled: `\x1b` on screen is always an escape, never text.
        assert_eq!(esc(r"a\x1b"), r"a\\x1b");
        // Ordinary text, non-ASCII included, is kept as it is (and not copied).
        for plain in [
            "test-client",
            "kworker/0:1",
            "größe",
            "日本語",
            "émoji 🦀",
            "",
        ] {
            assert!(
                matches!(esc(plain), Cow::Borrowed(p) if p == plain),
                "{plain}"
            );
        }
        assert_eq!(raw_control(&esc(EVIL)), None);
    }

    #[test]
    fn clients_table_escapes_the_process_name() {
        let t = clients_text(&[client(EVIL), client("größe")]);
        assert_eq!(raw_control(&t), None, "{t:?}");
        assert_eq!(t.lines().count(), 3, "no row injected: {t}");
        assert!(t.contains("x\\x1b[2J\\x1b]0;pwn\\x07\\n    1"), "{t}");
        assert!(t.contains(" größe "), "{t}");
        assert!(clients_text(&[client("")]).contains(" ? "));
    }

    #[test]
    fn mirrors_status_and_stats_escape_daemon_text() {
        let m = MirrorInfo {
            id: 1,
            addr: 0x1000,
            len: 0x1000,
            pages: 1,
            pid: 4242,
            seq: 1,
            state: EVIL.into(),
        };
        let t = mirrors_text(&[m]);
        assert_eq!(raw_control(&t), None, "{t:?}");
        assert_eq!(t.lines().count(), 2, "{t}");

        let status = |text: &str| Status {
            info: vec![
                ("daemon.version".into(), text.into()),
                ("socket".into(), text.into()),
                ("dirty.backend".into(), text.into()),
                (format!("dirty.refused.{text}"), text.into()),
            ],
            counters: vec![(text.into(), 1), ("server.clients".into(), 2)],
        };
        let st = status(EVIL);
        let t = status_text(&st, 4096);
        assert_eq!(raw_control(&t), None, "{t:?}");
        let rows = status_text(&status("x"), 4096).lines().count();
        assert_eq!(t.lines().count(), rows, "one line per row: {t}");
        let t = stats_text(&st.counters);
        assert_eq!(raw_control(&t), None, "{t:?}");
        assert_eq!(t.lines().count(), 2, "{t}");
        // Names stay aligned on their escaped width.
        let w = esc(EVIL).chars().count();
        assert!(t.contains(&format!("{:<w$}  2\n", "server.clients")), "{t}");
    }

    fn engine(state: &str) -> EngineInfo {
        EngineInfo {
            id: 3,
            pid: 5151,
            client_pid: 4242,
            mirror_id: 7,
            flushes: 12,
            depth: 1,
            tlb_entries: 37,
            acks: 11,
            ack_p50_us: 4,
            ack_p99_us: 250,
            overflows: 0,
            faults: 9,
            writes: 2,
            state: state.into(),
        }
    }

    #[test]
    fn engines_table_has_a_row_per_engine_and_escapes_the_state() {
        let t = engines_text(&[engine("attached"), engine(EVIL)]);
        assert_eq!(raw_control(&t), None, "{t:?}");
        assert_eq!(t.lines().count(), 3, "header and two rows: {t}");
        let header: Vec<&str> = t.lines().next().unwrap_or("").split_whitespace().collect();
        assert_eq!(
            header,
            [
                "ID",
                "PID",
                "CLIENT",
                "MIRROR",
                "FLUSHES",
                "DEPTH",
                "TLB",
                "ACKS",
                "ACK",
                "P50",
                "ACK",
                "P99",
                "OVERFLOWS",
                "FAULTS",
                "WRITES",
                "STATE"
            ]
        );
        let row: Vec<&str> = t.lines().nth(1).unwrap_or("").split_whitespace().collect();
        assert_eq!(
            row,
            [
                "3", "5151", "4242", "7", "12", "1", "37", "11", "4us", "250us", "0", "9", "2",
                "attached"
            ]
        );
        assert!(t.contains("  x\\x1b[2J"), "{t}");
        // Columns line up: every row is as wide as the header up to the state.
        let at = |l: &str| l.find("  attached").or_else(|| l.find("  x\\x1b"));
        assert_eq!(
            at(t.lines().nth(1).unwrap_or("")),
            t.lines().next().map(|h| h.len() - "  STATE".len())
        );
        let v = Value::Array(vec![engine_json(&engine(EVIL))]);
        let line = json_out(&v);
        assert_eq!(raw_control(&line), None, "{line:?}");
        let back: Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(back[0]["state"].as_str(), Some(EVIL));
        assert_eq!(back[0]["client_pid"].as_i64(), Some(4242));
        assert_eq!(back[0]["mirror_id"].as_u64(), Some(7));
        assert_eq!(back[0]["ack_p99_us"].as_u64(), Some(250));
        assert_eq!(back[0]["tlb_entries"].as_u64(), Some(37));
    }

    /// `status` as the daemon of the demo answers it: each line says what it means.
    #[test]
    fn status_lines_explain_themselves() {
        let info = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let mut st = Status {
            info: info(&[
                ("access.path", "mem-fd"),
                ("dirty.policy", "manual"),
                ("dirty.backend", "pagemap-scan"),
                ("dirty.requested", "auto"),
                (
                    "dirty.refused.soft-dirty",
                    "unavailable: no CONFIG_MEM_SOFT_DIRTY",
                ),
                (
                    "dirty.refused.uffd-wp",
                    "works, but pagemap-scan is preferred",
                ),
                ("dirty.refused.off", "not chosen: a back end works"),
                ("sessions.bound", "1"),
                ("sessions.tracing", "1"),
                ("sessions.control", "1"),
                ("sessions.handshake", "0"),
            ]),
            counters: vec![
                ("server.clients".into(), 3),
                ("server.clients_bound".into(), 1),
            ],
        };
        let t = status_text(&st, 4096);
        for want in [
            "memory access   through each client's own /proc/self/mem, handed over when it binds \
             (mem-fd)\n",
            "dirty tracking  pagemap-scan, the first back end that works here (--dirty-tracking \
             auto)\n",
            "                policy of a plain attach: manual (written pages are collected on \
             sync); attach_with picks one per range\n",
            "                soft-dirty not used: unavailable: no CONFIG_MEM_SOFT_DIRTY\n",
            "                uffd-wp not used: works, but pagemap-scan is preferred\n",
            "clients         3 connected: 1 bound client (mirroring memory), 1 trace stream, 1 \
             control session (this memshadowctl)\n",
        ] {
            assert!(t.contains(want), "{want:?} in\n{t}");
        }
        assert!(
            !t.contains("off not used"),
            "off is no alternative beside a back end: {t}"
        );
        assert!(!t.contains("refused"), "{t}");

        // Nothing works: off is what is used, and says so.
        st.info = info(&[
            ("dirty.policy", "periodic=50"),
            ("dirty.backend", "off"),
            ("dirty.requested", "auto"),
            ("dirty.refused.pagemap-scan", "unavailable: old kernel"),
        ]);
        let t = status_text(&st, 4096);
        assert!(
            t.contains("dirty tracking  off: no back end works here (--dirty-tracking auto)"),
            "{t}"
        );
        assert!(
            t.contains("periodic (written pages are collected every 50 ms)"),
            "{t}"
        );
        assert!(
            t.contains("pagemap-scan not used: unavailable: old kernel"),
            "{t}"
        );
        // A daemon without the sessions.* lines: the counters, and what the rest may be.
        assert!(
            t.contains("3 connected: 1 bound client (they mirror their memory), 2 others"),
            "{t}"
        );
        st.info = info(&[("dirty.backend", "uffd-wp"), ("dirty.requested", "uffd-wp")]);
        let t = status_text(&st, 4096);
        assert!(
            t.contains("dirty tracking  uffd-wp (--dirty-tracking uffd-wp)\n"),
            "{t}"
        );
    }

    #[test]
    fn text_out_escapes_whatever_was_missed_but_line_breaks() {
        assert_eq!(
            text_out("a\tb\nc\x1bd\u{9b}\n"),
            "a\\x09b\nc\\x1bd\\u{9b}\n"
        );
        assert!(matches!(text_out("ok\n"), Cow::Borrowed("ok\n")));
        // What esc made safe passes unchanged (a doubled backslash is not doubled again).
        let e = esc(EVIL);
        assert_eq!(text_out(&e), e);
    }

    #[test]
    fn json_output_carries_the_same_text_with_nothing_raw() {
        let v = Value::Array(vec![client_json(&client(EVIL))]);
        let line = json_out(&v);
        assert!(line.ends_with('\n'));
        assert_eq!(line.matches('\n').count(), 1);
        assert_eq!(raw_control(&line), None, "{line:?}");
        let back: Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(back, v, "the same value, only spelt differently");
        assert_eq!(back[0]["comm"].as_str(), Some(EVIL));
    }

    #[test]
    fn error_lines_escape_daemon_text() {
        let e = Error::PermissionDenied(EVIL.into());
        let l = error_line(&e);
        assert!(
            l.starts_with("memshadowctl: permission denied: x\\x1b[2J"),
            "{l}"
        );
        assert_eq!(raw_control(&l), None, "{l:?}");
        assert!(!l.contains('\n'), "one line: {l:?}");
    }

    #[test]
    fn hexdump_shows_addresses_and_text() {
        let d = hexdump(0x1000, b"hello, world!\x00\x01\x02zz");
        assert!(d.starts_with("0000000000001000  68 65 6c 6c 6f"), "{d}");
        assert!(d.contains("|hello, world!...|"), "{d}");
        assert!(d.contains("0000000000001010  7a 7a"), "{d}");
    }
}
