//! `memshadowctl`: pokes memshadowd from the shell. A thin front end over the client
//! library's control API (no protocol code of its own).
//!
//! Exit codes: 0 ok, 1 error, 2 usage, 3 daemon unreachable, 4 permission denied.

#![allow(clippy::print_stdout)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use memshadow::{
    event_bit, Client, ClientInfo, Error, EventKind, InvalidationReport, MirrorInfo, Status,
};
use serde_json::{json, Value};

/// Pokes memshadowd: status, clients, mirrors, counters, a live trace of invalidations,
/// device reads of a client's shadow and injected invalidations.
///
/// Exit codes: 0 ok, 1 error, 2 usage, 3 daemon unreachable, 4 permission denied.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Daemon socket [default: $MEMSHADOW_SOCKET, else /run/memshadow/memshadowd.sock for
    /// root, else $XDG_RUNTIME_DIR/memshadow/memshadowd.sock]
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
    /// Every counter of the daemon.
    Stats,
    /// A live stream of invalidations, until interrupted (or `--count` records).
    Trace {
        /// Only this client.
        #[arg(long)]
        pid: Option<i32>,
        /// Only these kinds (repeatable): unmap, clear, protection-vma, protection-page,
        /// soft-dirty, release.
        #[arg(long = "event", value_parser = parse_event)]
        events: Vec<EventKind>,
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
        Error::PermissionDenied(_) => exit::DENIED,
        _ => exit::ERROR,
    }
}

/// An error and its causes, on one line.
fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = match cli.socket.as_deref() {
        Some(p) => Client::connect_control(Some(p)),
        None => Client::connect_control(None),
    };
    let r = client.and_then(|c| run(&c, &cli));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memshadowctl: {}", memshadow::error_chain(&e));
            ExitCode::from(code_of(&e))
        }
    }
}

fn out(s: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_bytes());
}

fn run(c: &Client, cli: &Cli) -> Result<(), Error> {
    match &cli.cmd {
        Cmd::Status => {
            let st = c.status()?;
            if cli.json {
                out(&format!("{}\n", status_json(&st)));
            } else {
                out(&status_text(&st, c.page_size() as u64));
            }
        }
        Cmd::Clients => {
            let list = c.list_clients()?;
            if cli.json {
                let v: Vec<Value> = list.iter().map(client_json).collect();
                out(&format!("{}\n", Value::Array(v)));
            } else {
                out(&clients_text(&list));
            }
        }
        Cmd::Mirrors { pid } => {
            let list = c.list_mirrors_of(pid.unwrap_or(-1))?;
            if cli.json {
                let v: Vec<Value> = list.iter().map(mirror_json).collect();
                out(&format!("{}\n", Value::Array(v)));
            } else {
                out(&mirrors_text(&list));
            }
        }
        Cmd::Stats => {
            let mut counters = c.status()?.counters;
            counters.sort();
            if cli.json {
                let m: serde_json::Map<String, Value> =
                    counters.into_iter().map(|(k, v)| (k, json!(v))).collect();
                out(&format!("{}\n", Value::Object(m)));
            } else {
                let w = counters.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
                let mut s = String::new();
                for (k, v) in &counters {
                    s.push_str(&format!("{k:<w$}  {v}\n"));
                }
                out(&s);
            }
        }
        Cmd::Trace { pid, events, count } => {
            let mask = events.iter().fold(0, |m, k| m | event_bit(*k));
            let mut trace = c.trace(pid.unwrap_or(0), mask)?;
            if !cli.json {
                out(&format!(
                    "{:<15} {:>7} {:<10} {:<31} {:>5} {:>10} {:>10} {:>7}\n",
                    "TIME", "PID", "EVENT", "RANGE", "NOTIF", "START", "FINISH", "FLUSHES"
                ));
            }
            let mut seen = 0u64;
            while count.is_none_or(|n| seen < n) {
                let rec = trace.next_record()?;
                seen += 1;
                let line = if cli.json {
                    let mut v = report_json(&rec.report);
                    v["dropped"] = json!(rec.dropped);
                    v["time"] = json!(unix_now());
                    format!("{v}\n")
                } else {
                    let mut l = trace_text(&rec.report);
                    if rec.dropped > 0 {
                        l.push_str(&format!("  ({} lost before this)", rec.dropped));
                    }
                    l.push('\n');
                    l
                };
                let mut o = std::io::stdout().lock();
                if o.write_all(line.as_bytes())
                    .and_then(|()| o.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
        Cmd::Peek {
            pid,
            addr,
            len,
            hex: _,
            raw,
        } => {
            let bytes = c.peek(*pid, *addr, *len)?;
            if *raw {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&bytes).and_then(|()| o.flush());
            } else if cli.json {
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                out(&format!(
                    "{}\n",
                    json!({"pid": pid, "addr": addr, "len": bytes.len(), "hex": hex})
                ));
            } else {
                out(&hexdump(*addr, &bytes));
            }
        }
        Cmd::Sync { pid } => {
            let r = c.sync_pid(*pid)?;
            if cli.json {
                out(&format!(
                    "{}\n",
                    json!({
                        "pid": pid, "backend": r.backend.as_str(), "mirrors": r.mirrors,
                        "pages_scanned": r.pages_scanned, "pages_dirty": r.pages_dirty,
                        "regions": r.regions, "scan_ns": r.scan_ns,
                        "invalidate_ns": r.invalidate_ns,
                    })
                ));
            } else {
                out(&format!(
                    "synced pid {pid} ({}): {} mirror(s), {} page(s) scanned, {} written in {} \
                     run(s) invalidated; scan {}, invalidation {}\n",
                    r.backend.as_str(),
                    r.mirrors,
                    r.pages_scanned,
                    r.pages_dirty,
                    r.regions,
                    micros(r.scan_ns),
                    micros(r.invalidate_ns)
                ));
            }
        }
        Cmd::Invalidate {
            pid,
            addr,
            len,
            event,
            non_blocking,
        } => {
            let r = c.invalidate(*pid, *addr, *len, *event, *non_blocking)?;
            if cli.json {
                out(&format!("{}\n", report_json(&r)));
            } else {
                out(&invalidate_text(&r, *non_blocking));
            }
        }
    }
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

fn status_text(st: &Status, page: u64) -> String {
    let i = |k: &str| st.info(k).unwrap_or("?").to_owned();
    let n = |k: &str| st.counter(k).unwrap_or(0);
    let inv: u64 = st
        .counters
        .iter()
        .filter(|(k, _)| k.starts_with("device.inv_"))
        .map(|(_, v)| v)
        .sum();
    let mut rows = vec![
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
            duration(Duration::from_millis(n("server.uptime_ms"))),
        ),
        ("socket", i("socket")),
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
                bytes(n("shadow.slots_in_use") * page),
                i("device.shadow_mib")
            ),
        ),
        ("memory access", i("access.policy")),
    ];
    let dirty = match st.info("dirty.backend") {
        Some(b) => format!("{b}, policy {}", i("dirty.policy")),
        None => format!("{}, policy {}", i("dirty.tracking"), i("dirty.policy")),
    };
    rows.push(("dirty tracking", dirty));
    for (k, v) in &st.info {
        if let Some(name) = k.strip_prefix("dirty.refused.") {
            rows.push(("", format!("{name} refused: {v}")));
        }
    }
    rows.push((
        "clients",
        format!(
            "{} connected, {} bound",
            n("server.clients"),
            n("server.clients_bound")
        ),
    ));
    rows.push((
        "totals",
        format!(
            "{} uffd events, {} invalidations, {} faults, {} device reads",
            n("events.total"),
            inv,
            n("device.faults"),
            n("device.reads")
        ),
    ));
    rows.push((
        "",
        format!(
            "{} TLB flushes queued, {} coalesced, {} executed",
            n("device.flushes_queued"),
            n("device.flushes_coalesced"),
            n("device.flushes_executed")
        ),
    ));
    let mut s = String::new();
    for (k, v) in rows {
        s.push_str(&format!("{k:<15} {v}\n"));
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
            if c.comm.is_empty() { "?" } else { &c.comm },
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
            m.state
        ));
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
        assert_eq!(code_of(&Error::BadRange("x".into())), exit::ERROR);
    }

    #[test]
    fn hexdump_shows_addresses_and_text() {
        let d = hexdump(0x1000, b"hello, world!\x00\x01\x02zz");
        assert!(d.starts_with("0000000000001000  68 65 6c 6c 6f"), "{d}");
        assert!(d.contains("|hello, world!...|"), "{d}");
        assert!(d.contains("0000000000001010  7a 7a"), "{d}");
    }
}
