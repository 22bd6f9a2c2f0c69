//! `engine`: what external engines (docs/engines.md, `memshadow::Engine`) buy and cost, each
//! row against a baseline measured in the same run:
//!
//! 1. `read_hit_64`: `Engine::read` of 64 bytes that hit the engine's TLB, against the socket
//!    `Mirror::read` of the same bytes. Goal: engine p50 <= 1 µs and >= 50x faster. One hit
//!    is far below the clock's resolution, so reads are timed in batches of [`READ_BATCH`]
//!    (`Instant` around the batch, divided by its size); p50/p99 are over batches.
//! 2. `read_1mib`: `Engine::read` of 1 MiB whose pages are all in the shadow and the TLB,
//!    against `copy_from_slice` of the same 1 MiB of the client's buffer. Goal: >= 70% of
//!    the memcpy's bandwidth (ratio = memcpy time / engine time).
//! 3. `invalidate_m16_k4`: one `madvise(MADV_DONTNEED)` of a client range that M = 16
//!    notifiers cover and K = 4 external engines cache, each engine in a thread of its own that
//!    sleeps in `poll()` on its doorbell and acknowledges with `Engine::poll`. Measured with
//!    a two-pass daemon in its default `--mode two-pass-batched` (the start passes queue every
//!    engine's flushes and the walk rings each doorbell once) and a `--mode one-pass` daemon
//!    (both running at once, each its own client and engines); "two-pass" below is the
//!    batched mode. Goals: two-pass >= 12.8x faster than one-pass (16 notifiers
//!    waited for one after the other, at 80% efficiency), and two-pass <= 1.25x the slowest
//!    single acknowledgement + 20 µs (`invalidate_m16_k4_vs_one_ack`, the baseline being the
//!    same invalidation with one notifier: one flush on each of the 4 engines, one wait). See
//!    [`Setup`] for the layout and [`Rig::invalidate`] for how an invalidation is timed (the
//!    daemon's trace record); the same invalidations injected with `Control::invalidate`, and
//!    the times the client sees, are printed beside them as a cross-check, with the
//!    engines' doorbell wake-ups per invalidation and the daemon's acknowledgement waits.
//! 4. `munmap_2_engines`: the client's `munmap` of a populated, mirrored 64 KiB range that
//!    two engines (in threads of their own) hold translations of, against the same `munmap`
//!    with no engine. Goal: <= 1.25x.
//!
//! Goals are reported, never asserted: the benchmark exits 0 whether they are met or not,
//! and says which are not. A set-up that does not come out as intended (a fault where none
//! was expected, an invalidation that hit the wrong number of notifiers, an engine evicted)
//! is an error, not a number.
//!
//! Run: `cargo build --release --workspace --lib --bins --examples && cargo bench -p
//! memshadow-tests --bench engine -- --quick`. Prints a table and writes
//! `target/memshadow-bench/engine.json`.
#![allow(clippy::print_stdout)]

use std::cell::Cell;
use std::error::Error;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memshadow::{
    event_bit, Client, Control, Engine, EngineInfo, EventKind, InvalidationReport, Mirror, Target,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use serde_json::{json, Value};

type Res<T> = Result<T, Box<dyn Error>>;
/// A thread's result, its error as text (sendable).
type Res2<T> = Result<T, String>;

/// Says which step failed.
trait Ctx<T> {
    fn ctx(self, what: &str) -> Res<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}").into())
    }
}

#[path = "bench_daemon.rs"]
mod bench_daemon;
use bench_daemon::{BenchPaths, Daemon};
use memshadow_tests::{percentiles as stats, Percentiles as Stats};

/// Reads of one timed batch of `read_hit_64`.
const READ_BATCH: usize = 1000;
/// Bytes of the `read_1mib` row.
const BIG: usize = 1 << 20;
/// Notifiers (mirrors) and engines of the invalidation rows.
const M: usize = 16;
const K: usize = 4;
/// Pages of the invalidated range: M sub-mirrors of `RANGE_PAGES / M` pages each; all of
/// them fit in an engine's TLB (512 entries, direct-mapped by page number).
const RANGE_PAGES: usize = 64;
/// The range `munmap_2_engines` unmaps, and its engines.
const MUNMAP_RANGE: usize = 64 << 10;
const MUNMAP_ENGINES: usize = 2;
const WARMUP: usize = 20;
/// `--engine-ack-timeout-ms` of the daemons (their default): an engine slower than this
/// is evicted, which the benchmark treats as an error.
const ACK_TIMEOUT_MS: u64 = 1000;
/// How long the benchmark waits for an engine thread's answer or a trace record.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

const GOAL_HIT_P50_US: f64 = 1.0;
const GOAL_HIT_RATIO: f64 = 50.0;
const GOAL_BW_RATIO: f64 = 0.7;
const GOAL_ONE_OVER_TWO: f64 = 12.8;
const GOAL_ACK_FACTOR: f64 = 1.25;
const GOAL_ACK_SLACK_US: f64 = 20.0;
const GOAL_MUNMAP: f64 = 1.25;

// ---------------------------------------------------------------------------------------
// Memory.

fn page_size() -> usize {
    // SAFETY: sysconf with a valid name has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// A private anonymous mapping of this program's, unmapped on drop (or by [`Anon::unmap`]).
/// Only raw pointers reach into it, never a Rust reference.
#[derive(Debug)]
struct Anon {
    ptr: *mut u8,
    len: usize,
}

impl Anon {
    fn new(len: usize) -> Res<Anon> {
        let ptr =
            memshadow_tests::map_anon(len).map_err(|e| format!("mmap of {len} bytes: {e}"))?;
        Ok(Anon { ptr, len })
    }

    /// Writes `val` into one byte of every page (faulting the pages in).
    fn touch(&self, page: usize, val: u8) {
        for off in (0..self.len).step_by(page) {
            // SAFETY: `ptr..ptr+len` is our live read-write mapping; no reference to it
            // exists, so a volatile byte write cannot alias anything.
            unsafe { self.ptr.wrapping_add(off).write_volatile(val) };
        }
    }

    /// Fills the whole mapping with `val`.
    fn fill(&self, val: u8) {
        // SAFETY: `ptr..ptr+len` is our live read-write mapping; no reference to it exists.
        unsafe { std::ptr::write_bytes(self.ptr, val, self.len) };
    }

    /// Copies the first `dst.len()` bytes of the mapping into `dst` (a plain `memcpy`, as
    /// `copy_from_slice` makes).
    fn copy_to(&self, dst: &mut [u8]) {
        let n = dst.len().min(self.len);
        // SAFETY: `ptr..ptr+n` lies in our live mapping (initialised: anonymous memory
        // reads as zeros), which nothing writes during the call (this thread is in it, and
        // the daemon only reads); `dst` is borrowed mutably, so it is valid for `n` bytes
        // and cannot overlap a mapping no Rust reference reaches.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, dst.as_mut_ptr(), n) };
    }

    fn attach(&self, client: &Client) -> Res<Mirror> {
        // A previous range's mirror may still be retiring at this address: retry.
        let mut tries = 0;
        loop {
            match client.attach(self.ptr, self.len) {
                Ok(m) => return Ok(m),
                Err(memshadow::Error::Overlap(_)) if tries < 1000 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(format!("attach of {} bytes: {e}", self.len).into()),
            }
        }
    }

    /// A sub-range `off..off+len` of the mapping, attached.
    fn attach_part(&self, client: &Client, off: usize, len: usize) -> Res<Mirror> {
        if off + len > self.len {
            return Err("sub-range beyond the mapping".into());
        }
        client
            .attach(self.ptr.wrapping_add(off), len)
            .map_err(|e| format!("attach of {len} bytes at +{off:#x}: {e}").into())
    }

    fn madvise_dontneed(&self) -> Res<()> {
        // SAFETY: discards pages of our own mapping, which only raw pointers reach.
        let r = unsafe { libc::madvise(self.ptr.cast(), self.len, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(format!("madvise: {}", std::io::Error::last_os_error()).into());
        }
        Ok(())
    }

    /// Unmaps the mapping now; returns how long the `munmap` call took, in µs.
    fn unmap(self) -> Res<f64> {
        let (ptr, len) = (self.ptr, self.len);
        std::mem::forget(self);
        let t = Instant::now();
        // SAFETY: `ptr..ptr+len` is our mapping, forgotten above so nothing uses it again.
        let r = unsafe { libc::munmap(ptr.cast(), len) };
        let us = t.elapsed().as_secs_f64() * 1e6;
        if r != 0 {
            return Err(format!("munmap: {}", std::io::Error::last_os_error()).into());
        }
        Ok(us)
    }
}

impl Drop for Anon {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is our mapping; it is dropped, so nothing uses it again.
        let _ = unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// ---------------------------------------------------------------------------------------
// Statistics.

// ---------------------------------------------------------------------------------------
// Engines in threads of their own.

/// What the benchmark asks an engine thread.
#[derive(Debug, Clone, Copy)]
enum Cmd {
    /// Read the whole mirror (so the engine holds every translation), check every page
    /// holds `stamp`, answer with the faults it took.
    ReadAll { stamp: u8 },
    /// Drop the engine and end.
    Stop,
}

/// What an engine thread answers.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Attached,
    Read { faults: u64 },
    Stopped(Done),
}

/// An engine thread's account when it stops.
#[derive(Debug, Clone, Copy)]
struct Done {
    /// Doorbell wake-ups it handled with `Engine::poll`.
    polls: u64,
    /// The daemon evicted it (expected only once its mirror is gone).
    evicted: bool,
}

/// An external engine attached in, and driven from, a thread of its own. The thread sleeps in
/// `poll()` on the engine's doorbell and on a command eventfd; a doorbell wakes it to
/// acknowledge (`Engine::poll`), a command to read or stop. Stopped and joined on drop.
#[derive(Debug)]
struct EngineThread {
    bell: Arc<EventFd>,
    cmds: Sender<Cmd>,
    replies: Receiver<Res2<Reply>>,
    handle: Option<JoinHandle<()>>,
}

impl EngineThread {
    /// Starts a thread that attaches with `token` at `socket`; returns once it attached.
    fn spawn(socket: &Path, token: u128, name: &str) -> Res<EngineThread> {
        let bell = Arc::new(
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| format!("eventfd: {e}"))?,
        );
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (rep_tx, rep_rx) = mpsc::channel();
        let handle = {
            let (socket, bell) = (socket.to_path_buf(), Arc::clone(&bell));
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let r = engine_main(&socket, token, &bell, &cmd_rx, &rep_tx);
                    if let Err(e) = r {
                        let _ = rep_tx.send(Err(e));
                    }
                })?
        };
        let t = EngineThread {
            bell,
            cmds: cmd_tx,
            replies: rep_rx,
            handle: Some(handle),
        };
        match t.reply()? {
            Reply::Attached => Ok(t),
            r => Err(format!("engine thread answered {r:?} instead of attaching").into()),
        }
    }

    fn send(&self, cmd: Cmd) -> Res<()> {
        self.cmds
            .send(cmd)
            .map_err(|_| "an engine thread has ended")?;
        self.bell
            .write(1)
            .map_err(|e| format!("eventfd write: {e}"))?;
        Ok(())
    }

    fn reply(&self) -> Res<Reply> {
        match self.replies.recv_timeout(REPLY_TIMEOUT) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(format!("engine thread: {e}").into()),
            Err(_) => Err(format!(
                "an engine thread did not answer within {} s",
                REPLY_TIMEOUT.as_secs()
            )
            .into()),
        }
    }

    /// Stops the engine and joins its thread.
    fn stop(mut self) -> Res<Done> {
        self.send(Cmd::Stop)?;
        let r = self.reply();
        if let Some(h) = self.handle.take() {
            h.join().map_err(|_| "an engine thread panicked")?;
        }
        match r? {
            Reply::Stopped(d) => Ok(d),
            r => Err(format!("engine thread answered {r:?} to stop").into()),
        }
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.send(Cmd::Stop);
            let _ = h.join();
        }
    }
}

/// Sends `cmd` to every engine, then collects their answers (so they work in parallel).
fn ask_all(engines: &[EngineThread], cmd: Cmd) -> Res<Vec<Reply>> {
    for e in engines {
        e.send(cmd)?;
    }
    engines.iter().map(EngineThread::reply).collect()
}

/// Every engine reads its whole mirror (checking every page holds `stamp`); returns the
/// faults they took (none expected: the client populated the pages).
fn read_all(engines: &[EngineThread], stamp: u8) -> Res<u64> {
    let mut total = 0;
    for r in ask_all(engines, Cmd::ReadAll { stamp })? {
        match r {
            Reply::Read { faults } => total += faults,
            r => return Err(format!("engine thread answered {r:?} to a read").into()),
        }
    }
    Ok(total)
}

fn engine_main(
    socket: &Path,
    token: u128,
    bell: &EventFd,
    cmds: &Receiver<Cmd>,
    replies: &Sender<Res2<Reply>>,
) -> Res2<()> {
    let mut engine =
        Engine::attach(Some(socket), token).map_err(|e| format!("Engine::attach: {e}"))?;
    let page = engine.page_size() as usize;
    let mut buf = vec![0u8; engine.len() as usize];
    let mut polls = 0u64;
    let mut evicted = false;
    let send = |r: Reply| {
        replies
            .send(Ok(r))
            .map_err(|_| "the benchmark has gone".to_string())
    };
    send(Reply::Attached)?;
    loop {
        let (bell_ready, door_ready) = {
            let mut fds = vec![PollFd::new(bell.as_fd(), PollFlags::POLLIN)];
            if !evicted {
                fds.push(PollFd::new(engine.fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ready =
                |f: Option<&PollFd<'_>>| f.and_then(PollFd::revents).is_some_and(|r| !r.is_empty());
            (ready(fds.first()), ready(fds.get(1)))
        };
        if door_ready {
            match engine.poll() {
                Ok(()) => polls += 1,
                Err(memshadow::Error::Evicted(_)) => evicted = true,
                Err(e) => return Err(format!("Engine::poll: {e}")),
            }
        }
        if !bell_ready {
            continue;
        }
        // EAGAIN: a command that an earlier wake-up already took.
        let _ = bell.read();
        while let Ok(cmd) = cmds.try_recv() {
            match cmd {
                Cmd::ReadAll { stamp } => {
                    if evicted {
                        return Err("asked to read after being evicted".into());
                    }
                    let f0 = engine.stats().faults;
                    engine
                        .read(0, &mut buf)
                        .map_err(|e| format!("Engine::read: {e}"))?;
                    if let Some(at) = buf.iter().step_by(page).position(|b| *b != stamp) {
                        return Err(format!(
                            "page {at} of the mirror reads {} instead of {stamp}",
                            buf[at * page]
                        ));
                    }
                    send(Reply::Read {
                        faults: engine.stats().faults - f0,
                    })?;
                }
                Cmd::Stop => {
                    let done = Done { polls, evicted };
                    drop(engine);
                    return send(Reply::Stopped(done));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Daemons and their trace streams.

fn start_daemon(bin: &Path, socket: PathBuf, mode: &str) -> Res<Daemon> {
    let mut cmd = Command::new(bin);
    cmd.arg("--no-config")
        .arg("--socket")
        .arg(&socket)
        .args(["--mode", mode])
        .args(["--engine-ack-timeout-ms", &ACK_TIMEOUT_MS.to_string()])
        .env("MEMSHADOW_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Daemon::start("engine", cmd, socket, " (its log is above)")
}

/// A daemon with a trace stream of this process's `Clear` invalidations, read by a thread
/// that stamps each record with the time it arrived. Dropping it stops the daemon first
/// (which ends the stream), then joins the thread.
#[derive(Debug)]
struct Traced {
    daemon: Option<Daemon>,
    records: Receiver<(Instant, InvalidationReport)>,
    reader: Option<JoinHandle<Res2<()>>>,
}

impl Traced {
    /// Subscribes to the `Clear` invalidations of this process (a bound client of `daemon`
    /// by now) on `control`'s daemon.
    fn start(daemon: Daemon, control: &Control, mode: &str) -> Res<Traced> {
        let mut trace = control
            .trace(
                Target::Pid(std::process::id() as i32),
                event_bit(EventKind::Clear),
            )
            .map_err(|e| format!("trace of the {mode} daemon: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name(format!("trace-{mode}"))
            .spawn(move || loop {
                match trace.next_record() {
                    Ok(r) => {
                        let at = Instant::now();
                        if r.dropped != 0 {
                            return Err(format!("the trace stream lost {} records", r.dropped));
                        }
                        if tx.send((at, r.report)).is_err() {
                            return Ok(());
                        }
                    }
                    Err(memshadow::Error::DaemonGone) => return Ok(()),
                    Err(e) => return Err(format!("trace: {e}")),
                }
            })?;
        Ok(Traced {
            daemon: Some(daemon),
            records: rx,
            reader: Some(reader),
        })
    }

    fn socket(&self) -> &Path {
        self.daemon.as_ref().map_or(Path::new(""), |d| &d.socket)
    }

    /// The next record of an invalidation of `start..end`, and when it arrived.
    fn record(&self, start: u64, end: u64) -> Res<(Instant, InvalidationReport)> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, r) = self.records.recv_timeout(left).map_err(|_| {
                format!(
                    "no trace record of the invalidation of {start:#x}..{end:#x} within {} s",
                    REPLY_TIMEOUT.as_secs()
                )
            })?;
            if r.start == start && r.end == end {
                return Ok((at, r));
            }
        }
    }

    /// Stops the daemon and joins the trace reader; its error, if it had one.
    fn stop(&mut self) -> Res<()> {
        drop(self.daemon.take());
        if let Some(h) = self.reader.take() {
            h.join().map_err(|_| "the trace thread panicked")??;
        }
        Ok(())
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// Rows 1 and 2: reads.

struct ReadRows {
    hit: Row,
    big: Row,
}

fn read_rows(socket: &Path, iters: usize) -> Res<ReadRows> {
    let client = Client::connect_to(socket).ctx("Client::connect_to")?;
    let map = Anon::new(BIG)?;
    map.fill(0x5a);
    let mirror = map.attach(&client)?;
    mirror.populate(0, BIG as u64).ctx("populate")?;
    let token = mirror.grant().ctx("grant")?;
    let mut engine = Engine::attach(Some(socket), token).ctx("Engine::attach")?;
    let mut big = vec![0u8; BIG];
    engine.read(0, &mut big).ctx("Engine::read")?;
    if big.iter().any(|b| *b != 0x5a) {
        return Err("the engine's first 1 MiB read is not the client's bytes".into());
    }
    let before = engine.stats();
    if before.faults != 0 {
        return Err(format!(
            "the engine faulted {} times reading a populated mirror",
            before.faults
        )
        .into());
    }

    // 64-byte TLB hits, in batches, against socket reads; interleaved.
    let mut small = [0u8; 64];
    let mut hits = Vec::with_capacity(iters);
    let mut sock = Vec::with_capacity(iters);
    for i in 0..WARMUP + iters {
        let t = Instant::now();
        for _ in 0..READ_BATCH {
            engine
                .read(0, std::hint::black_box(&mut small))
                .ctx("Engine::read")?;
        }
        let per_op = t.elapsed().as_secs_f64() * 1e6 / READ_BATCH as f64;
        let t = Instant::now();
        mirror.read(0, &mut small).ctx("Mirror::read")?;
        let one = t.elapsed().as_secs_f64() * 1e6;
        if i >= WARMUP {
            hits.push(per_op);
            sock.push(one);
        }
    }
    if small != [0x5a; 64] {
        return Err("a 64-byte read is not the client's bytes".into());
    }
    let after = engine.stats();
    let reads = ((WARMUP + iters) * READ_BATCH) as u64;
    if after.faults != before.faults || after.tlb_hits - before.tlb_hits < reads {
        return Err(format!(
            "the 64-byte reads were not all TLB hits: {} hits, {} misses, {} faults for \
             {reads} reads",
            after.tlb_hits - before.tlb_hits,
            after.tlb_misses - before.tlb_misses,
            after.faults - before.faults
        )
        .into());
    }
    let hit = Row {
        op: "read_hit_64",
        engine: stats(hits),
        baseline: "socket Mirror::read of the same 64 bytes",
        base: stats(sock),
        kind: RowKind::Faster {
            max_p50_us: GOAL_HIT_P50_US,
            min_ratio: GOAL_HIT_RATIO,
        },
        note: format!(
            "engine: Instant around batches of {READ_BATCH} reads, per-op = batch / \
             {READ_BATCH}; p50/p99 over batches. baseline: one read per sample"
        ),
        extra: json!({"batch": READ_BATCH}),
    };

    // 1 MiB from the shadow, against a memcpy of the client's buffer; interleaved.
    let bw_iters = iters.max(50);
    let mut eng = Vec::with_capacity(bw_iters);
    let mut cpy = Vec::with_capacity(bw_iters);
    for i in 0..WARMUP + bw_iters {
        let t = Instant::now();
        engine
            .read(0, std::hint::black_box(&mut big))
            .ctx("Engine::read")?;
        let e = t.elapsed().as_secs_f64() * 1e6;
        let t = Instant::now();
        map.copy_to(std::hint::black_box(&mut big));
        let c = t.elapsed().as_secs_f64() * 1e6;
        if i >= WARMUP {
            eng.push(e);
            cpy.push(c);
        }
    }
    if engine.stats().faults != before.faults {
        return Err("the 1 MiB reads faulted".into());
    }
    // Bytes per µs are MB/s.
    let bw = |us: f64| BIG as f64 / us;
    let (e, c) = (stats(eng), stats(cpy));
    let big_row = Row {
        op: "read_1mib",
        engine: e,
        baseline: "memcpy of the client's 1 MiB",
        base: c,
        kind: RowKind::Bandwidth {
            min_ratio: GOAL_BW_RATIO,
        },
        note: format!(
            "one 1 MiB read per sample, pages in the shadow and the TLB; engine {:.0} MB/s, \
             memcpy {:.0} MB/s at p50",
            bw(e.p50),
            bw(c.p50)
        ),
        extra: json!({
            "bytes": BIG,
            "engine_MBps": num(bw(e.p50)),
            "baseline_MBps": num(bw(c.p50)),
        }),
    };
    engine.detach();
    mirror.detach().ctx("detach")?;
    drop(map);
    Ok(ReadRows { hit, big: big_row })
}

// ---------------------------------------------------------------------------------------
// Row 3: invalidations with engines acknowledging from their own threads.

/// One client range covered by `m` notifiers and cached by `K` engines.
///
/// The layout. An engine attaches to one mirror and is sent a flush by every notifier
/// whose zapped pages lie in that mirror (`PageTable::flush_external` pushes to each engine
/// whose mirror overlaps the pages, whichever mirror installed them). For each of the M
/// notifiers to wait for each of the K engines, as M GPU notifiers over one buffer wait for
/// K tiles, the engines must see the whole range. So the range has one *whole* mirror, which
/// the engines attach to, and `m` *sub-mirrors* that split it into equal parts, attached
/// after it: the daemon installs a page under the covering mirror that starts last, the
/// later-attached of equal starts (`mirror_at`), whoever faults it in, so every page belongs
/// to its sub-mirror (checked), and only the sub-mirrors' notifiers zap anything. An invalidation of the whole range hits `m + 1` notifiers; the
/// whole mirror's zaps nothing and queues no flush; each sub-mirror's zaps its part and
/// queues one flush on each of the K engines. Two-pass: all `m x K` flushes are queued in
/// the walk, the finishes then wait once. One-pass: each sub-mirror's callback queues its
/// K flushes and waits for them before the next one runs, so the `m` waits add up.
///
/// With `m = 1` (one sub-mirror over the whole range) an invalidation is one flush on each of
/// the K engines and one wait: the slowest single acknowledgement of the K engines.
///
/// No device read goes through the daemon's built-in engines here (the engines read the
/// shadow themselves, and the client populates), so no notifier queues a built-in flush:
/// their modelled `--flush-latency-us` plays no part (each trace record is checked for it).
#[derive(Debug)]
struct Setup {
    // Dropped in this order: the engines, the mirrors, the mapping.
    engines: Vec<EngineThread>,
    parts: Vec<Mirror>,
    whole: Mirror,
    map: Anon,
    /// What every page of the client's range holds.
    content: Cell<u8>,
    /// Faults the engines took reading populated pages.
    faults: Cell<u64>,
    m: usize,
    start: u64,
    end: u64,
}

impl Setup {
    fn new(client: &Client, socket: &Path, m: usize, page: usize, tag: &str) -> Res<Setup> {
        let len = RANGE_PAGES * page;
        let map = Anon::new(len)?;
        map.touch(page, 1);
        let whole = map.attach(client)?;
        let part = len / m;
        let parts = (0..m)
            .map(|i| map.attach_part(client, i * part, part))
            .collect::<Res<Vec<_>>>()?;
        let engines = (0..K)
            .map(|k| {
                let token = whole.grant().ctx("grant")?;
                EngineThread::spawn(socket, token, &format!("{tag}-engine{k}"))
            })
            .collect::<Res<Vec<_>>>()?;
        let s = Setup {
            m,
            start: map.ptr as u64,
            end: map.ptr as u64 + len as u64,
            map,
            whole,
            parts,
            engines,
            content: Cell::new(1),
            faults: Cell::new(0),
        };
        s.fill(client)?;
        s.check_layout(client)?;
        Ok(s)
    }

    /// The client populates the range (so the pages land in the sub-mirrors), then every
    /// engine reads all of it and must find [`Setup::content`] in every page. An engine that
    /// faults (none should: a page the populate skipped, say) installs the page under its
    /// sub-mirror all the same; it is counted, and the layout checked again.
    fn fill(&self, client: &Client) -> Res<()> {
        self.whole
            .populate(0, self.whole.len())
            .ctx("populate of the invalidated range")?;
        let faults = read_all(&self.engines, self.content.get())?;
        if faults > 0 {
            self.faults.set(self.faults.get() + faults);
            self.check_layout(client)?;
        }
        Ok(())
    }

    /// Every page is in its sub-mirror, none in the whole mirror.
    fn check_layout(&self, client: &Client) -> Res<()> {
        let list = client.list_mirrors().ctx("list_mirrors")?;
        let pages_of = |id: u64| list.iter().find(|x| x.id == id).map_or(0, |x| x.pages);
        let part = (RANGE_PAGES / self.m) as u64;
        if pages_of(self.whole.id()) != 0 || self.parts.iter().any(|p| pages_of(p.id()) != part) {
            return Err(format!(
                "the pages are not in the sub-mirrors: whole mirror {}, sub-mirrors {:?}",
                pages_of(self.whole.id()),
                self.parts
                    .iter()
                    .map(|p| pages_of(p.id()))
                    .collect::<Vec<_>>()
            )
            .into());
        }
        Ok(())
    }

    /// Stops the engines (checking none was evicted) and detaches.
    fn close(self) -> Res<Vec<Done>> {
        let done = self
            .engines
            .into_iter()
            .map(EngineThread::stop)
            .collect::<Res<Vec<_>>>()?;
        if done.iter().any(|d| d.evicted) {
            return Err("an engine was evicted: it did not acknowledge within \
                        --engine-ack-timeout-ms"
                .into());
        }
        Ok(done)
    }
}

/// How the client makes the invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// `madvise(MADV_DONTNEED)` of the whole range: the uffd `REMOVE` event's invalidation,
    /// its start pass on the daemon's event reader, its finish pass handed to the finisher
    /// thread.
    Madvise,
    /// `Control::invalidate` of the whole range (event `Clear`): the same walk and finish,
    /// run back to back on the thread serving the request.
    Injected,
}

const WAYS: [Way; 2] = [Way::Madvise, Way::Injected];

/// How one invalidation was timed.
#[derive(Debug, Clone, Copy)]
struct Timed {
    /// The daemon's own time of it: its start pass plus its finish pass (trace record).
    daemon_us: f64,
    /// The two passes apart.
    start_us: f64,
    finish_us: f64,
    /// Seen from the client: `madvise` called to trace record received, or the
    /// `Control::invalidate` call.
    e2e_us: f64,
}

/// A daemon of one mode with its client and its two set-ups (M = 16 and M = 1).
struct Rig {
    traced: Traced,
    client: Client,
    control: Control,
    sets: Vec<Setup>,
}

impl Rig {
    fn new(bin: &Path, dir: &Path, mode: &'static str, page: usize) -> Res<Rig> {
        let daemon = start_daemon(bin, dir.join(format!("{mode}.sock")), mode)?;
        let client = Client::connect_to(&daemon.socket).ctx("Client::connect_to")?;
        let control = Control::connect_to(&daemon.socket).ctx("Control::connect_to")?;
        let traced = Traced::start(daemon, &control, mode)?;
        let sets = SETS
            .into_iter()
            .map(|m| Setup::new(&client, traced.socket(), m, page, &format!("{mode}-m{m}")))
            .collect::<Res<Vec<_>>>()?;
        Ok(Rig {
            traced,
            client,
            control,
            sets,
        })
    }

    /// One invalidation of set-up `i`, made `way`: the engines hold every translation when
    /// it starts; its trace record is awaited; then the client populates the range again
    /// and the engines read it all (they must see what the client's memory now holds: zeros
    /// once it was `madvise`d). The client does not write its pages again: a write right
    /// after the `madvise` can hide the zap from the daemon's fence, which then stays up
    /// for its 200 ms timeout (docs/design.md §4, "Fences").
    ///
    /// The time is the daemon's: `start_ns + finish_ns` of the record, the walk of the
    /// notifiers (in one-pass mode, with every wait) and then the finish pass (in two-pass
    /// mode, the waits). For a `madvise` the finish pass runs on the daemon's finisher
    /// thread, so the hand-off between the passes is in neither field, and acknowledgements
    /// that arrive during it cost nothing in the record; an injected invalidation runs both
    /// passes back to back on one thread, so its record is the whole of it.
    fn invalidate(&self, i: usize, way: Way) -> Res<Timed> {
        let s = &self.sets[i];
        let t0 = Instant::now();
        let (e2e_us, r) = match way {
            Way::Madvise => {
                s.map.madvise_dontneed()?;
                s.content.set(0);
                let (at, r) = self.traced.record(s.start, s.end)?;
                (at.duration_since(t0).as_secs_f64() * 1e6, r)
            }
            Way::Injected => {
                let r = self
                    .control
                    .invalidate(
                        std::process::id() as i32,
                        s.start,
                        s.end - s.start,
                        EventKind::Clear,
                        false,
                    )
                    .map_err(|e| format!("Control::invalidate: {e}"))?;
                let us = t0.elapsed().as_secs_f64() * 1e6;
                // Its trace record too, so the stream stays in step.
                self.traced.record(s.start, s.end)?;
                (us, r)
            }
        };
        check_report(&r, s.m + 1)?;
        s.fill(&self.client)?;
        Ok(Timed {
            daemon_us: (r.start_ns + r.finish_ns) as f64 / 1e3,
            start_us: r.start_ns as f64 / 1e3,
            finish_us: r.finish_ns as f64 / 1e3,
            e2e_us,
        })
    }

    /// The daemon's view of this client's engines, set-up by set-up, each checked: still
    /// attached, sent one flush per notifier of its set-up per invalidation (`per_set`
    /// invalidations of each; which shows that every notifier flushed every engine), and
    /// never a full ring.
    fn engines(&self, per_set: u64) -> Res<Vec<EngineInfo>> {
        let all = self
            .control
            .engines(Target::Pid(std::process::id() as i32))
            .ctx("Control::engines")?;
        let mut out = Vec::new();
        for s in &self.sets {
            let mut mine: Vec<EngineInfo> = all
                .iter()
                .filter(|e| e.mirror_id == s.whole.id())
                .cloned()
                .collect();
            mine.sort_by_key(|e| e.id);
            let want = per_set * s.m as u64;
            if mine.len() != K
                || mine
                    .iter()
                    .any(|e| e.flushes != want || e.overflows != 0 || e.state != "attached")
            {
                return Err(format!(
                    "the engines of the M={} set-up are not as expected ({K} attached, {want} \
                     flushes each, no overflow): {mine:?}",
                    s.m
                )
                .into());
            }
            out.extend(mine);
        }
        Ok(out)
    }

    /// Stops every engine and the daemon; what the engines of each set-up counted, or the
    /// first error met on the way.
    fn close(mut self) -> Res<Vec<Vec<Done>>> {
        let mut first_err: Option<Box<dyn Error>> = None;
        let mut done = Vec::new();
        for s in self.sets.drain(..) {
            match s.close() {
                Ok(d) => done.push(d),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        drop(self.control);
        drop(self.client);
        if let Err(e) = self.traced.stop() {
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(done), Err)
    }
}

/// The record of one whole-range invalidation: `notifiers` hit, no built-in flush, not
/// refused.
fn check_report(r: &InvalidationReport, notifiers: usize) -> Res<()> {
    if r.notifiers as usize != notifiers || r.would_block || r.flushes_queued != 0 {
        return Err(format!(
            "the invalidation was not the one set up: {} notifiers (want {notifiers}), {} \
             built-in flushes (want 0), would_block {}",
            r.notifiers, r.flushes_queued, r.would_block
        )
        .into());
    }
    Ok(())
}

/// The set-ups of each daemon: M notifiers, then one (the single acknowledgement).
const SETS: [usize; 2] = [M, 1];

/// One daemon's results, indexed `[set-up][way]`.
#[derive(Debug)]
struct ModeResult {
    daemon: [[Stats; 2]; 2],
    start: [[Stats; 2]; 2],
    finish: [[Stats; 2]; 2],
    e2e: [[Stats; 2]; 2],
    engines: Vec<EngineInfo>,
    /// Doorbell wake-ups per invalidation of each engine, per set-up.
    wakeups: [Vec<f64>; 2],
    /// Faults the engines took reading pages the client had populated (none expected).
    faults: u64,
}

/// Runs `iters` invalidations per set-up per way per mode, all interleaved (so a drift of
/// the machine affects them alike).
fn invalidate_rows(bin: &Path, dir: &Path, iters: usize, page: usize) -> Res<[ModeResult; 2]> {
    let rigs = [
        Rig::new(bin, dir, "two-pass-batched", page)?,
        Rig::new(bin, dir, "one-pass", page)?,
    ];
    // [mode][set][way]
    let mut samples: [[[Vec<Timed>; 2]; 2]; 2] = Default::default();
    let run = (|| -> Res<()> {
        for it in 0..WARMUP + iters {
            for (r, rig) in rigs.iter().enumerate() {
                for n in 0..SETS.len() * WAYS.len() {
                    // Vary the order from one round to the next.
                    let n = (n + it) % (SETS.len() * WAYS.len());
                    let (set, w) = (n / WAYS.len(), n % WAYS.len());
                    let t = rig.invalidate(set, WAYS[w])?;
                    if it >= WARMUP {
                        samples[r][set][w].push(t);
                    }
                }
            }
        }
        Ok(())
    })();
    let per_set = ((WARMUP + iters) * WAYS.len()) as u64;
    let engines = rigs
        .iter()
        .map(|r| r.engines(per_set))
        .collect::<Res<Vec<_>>>();
    let faults = rigs
        .each_ref()
        .map(|r| r.sets.iter().map(|s| s.faults.get()).sum::<u64>());
    let mut closed = Vec::new();
    let mut close_err = Ok(());
    for rig in rigs {
        match rig.close() {
            Ok(d) => closed.push(d),
            Err(e) => close_err = close_err.and(Err(e)),
        }
    }
    run?;
    close_err?;
    let invalidations = ((WARMUP + iters) * WAYS.len()) as f64;
    let mut engines = engines?.into_iter();
    let mut closed = closed.into_iter();
    let mut out = Vec::new();
    for (per_set, faults) in samples.into_iter().zip(faults) {
        let pick = |f: fn(&Timed) -> f64| {
            per_set
                .each_ref()
                .map(|ways| ways.each_ref().map(|v| stats(v.iter().map(f).collect())))
        };
        let done = closed.next().unwrap_or_default();
        let mut wakeups: [Vec<f64>; 2] = Default::default();
        for (w, d) in wakeups.iter_mut().zip(&done) {
            *w = d.iter().map(|d| d.polls as f64 / invalidations).collect();
        }
        out.push(ModeResult {
            daemon: pick(|t| t.daemon_us),
            start: pick(|t| t.start_us),
            finish: pick(|t| t.finish_us),
            e2e: pick(|t| t.e2e_us),
            engines: engines.next().unwrap_or_default(),
            wakeups,
            faults,
        });
    }
    out.try_into().map_err(|_| "not two modes".into())
}

// ---------------------------------------------------------------------------------------
// Row 4: munmap with engines.

fn munmap_row(socket: &Path, iters: usize, page: usize) -> Res<Row> {
    let client = Client::connect_to(socket).ctx("Client::connect_to")?;
    let mut with = Vec::with_capacity(iters);
    let mut without = Vec::with_capacity(iters);
    let mut evictions = 0usize;
    let mut faults = 0u64;
    for it in 0..WARMUP + iters {
        for pass in 0..2 {
            let engines_now = (it + pass) % 2 == 0;
            let map = Anon::new(MUNMAP_RANGE)?;
            map.touch(page, 3);
            let mirror = map.attach(&client)?;
            mirror.populate(0, MUNMAP_RANGE as u64).ctx("populate")?;
            let engines = if engines_now {
                let e = (0..MUNMAP_ENGINES)
                    .map(|k| {
                        let token = mirror.grant().ctx("grant")?;
                        EngineThread::spawn(socket, token, &format!("munmap-engine{k}"))
                    })
                    .collect::<Res<Vec<_>>>()?;
                faults += read_all(&e, 3)?;
                e
            } else {
                Vec::new()
            };
            let us = map.unmap()?;
            for e in engines {
                // Its mirror is gone: the daemon evicts it (expected).
                evictions += usize::from(e.stop()?.evicted);
            }
            // The daemon retired the mirror on UNMAP; the detach this sends is harmless.
            drop(mirror);
            if it >= WARMUP {
                if engines_now {
                    with.push(us);
                } else {
                    without.push(us);
                }
            }
        }
    }
    Ok(Row {
        op: "munmap_2_engines",
        engine: stats(with),
        baseline: "the same munmap, no engine",
        base: stats(without),
        kind: RowKind::Slower {
            max_ratio: GOAL_MUNMAP,
        },
        note: format!(
            "munmap of a populated {} KiB mirror; {MUNMAP_ENGINES} engines (own threads, \
             polling their doorbells) hold every page's translation; {evictions} engines \
             were evicted after their mirror was unmapped, as expected; {faults} engine \
             faults on populated pages",
            MUNMAP_RANGE >> 10
        ),
        extra: json!({
            "bytes": MUNMAP_RANGE,
            "engines": MUNMAP_ENGINES,
            "evictions": evictions,
            "engine_faults": faults,
        }),
    })
}

// ---------------------------------------------------------------------------------------
// Rows and output.

#[derive(Debug, Clone, Copy)]
enum RowKind {
    /// engine p50 <= `max_p50_us` and baseline/engine >= `min_ratio`.
    Faster { max_p50_us: f64, min_ratio: f64 },
    /// baseline time / engine time (= engine bandwidth / baseline bandwidth) >= `min_ratio`.
    Bandwidth { min_ratio: f64 },
    /// engine / baseline <= `max_ratio`.
    Slower { max_ratio: f64 },
    /// baseline / engine >= `min_ratio`.
    Speedup { min_ratio: f64 },
    /// engine <= `factor` x baseline + `slack_us` (ratio = engine / baseline).
    Bound { factor: f64, slack_us: f64 },
}

#[derive(Debug)]
struct Row {
    op: &'static str,
    engine: Stats,
    baseline: &'static str,
    base: Stats,
    kind: RowKind,
    note: String,
    extra: Value,
}

impl Row {
    fn ratio(&self) -> f64 {
        match self.kind {
            RowKind::Faster { .. } | RowKind::Bandwidth { .. } | RowKind::Speedup { .. } => {
                self.base.p50 / self.engine.p50
            }
            RowKind::Slower { .. } | RowKind::Bound { .. } => self.engine.p50 / self.base.p50,
        }
    }

    fn goal(&self) -> String {
        match self.kind {
            RowKind::Faster {
                max_p50_us,
                min_ratio,
            } => format!("p50<={max_p50_us}us, x>={min_ratio}"),
            RowKind::Bandwidth { min_ratio } => format!("bw>={:.0}%", min_ratio * 100.0),
            RowKind::Slower { max_ratio } => format!("<={max_ratio}x"),
            RowKind::Speedup { min_ratio } => format!("x>={min_ratio}"),
            RowKind::Bound { factor, slack_us } => format!("<={factor}x+{slack_us}us"),
        }
    }

    fn met(&self) -> Option<bool> {
        let r = self.ratio();
        if !r.is_finite() {
            return None;
        }
        Some(match self.kind {
            RowKind::Faster {
                max_p50_us,
                min_ratio,
            } => self.engine.p50 <= max_p50_us && r >= min_ratio,
            RowKind::Bandwidth { min_ratio } | RowKind::Speedup { min_ratio } => r >= min_ratio,
            RowKind::Slower { max_ratio } => r <= max_ratio,
            RowKind::Bound { factor, slack_us } => {
                self.engine.p50 <= factor * self.base.p50 + slack_us
            }
        })
    }

    fn json(&self, setting: &Value) -> Value {
        json!({
            "op": self.op,
            "engine_p50_us": num(self.engine.p50),
            "engine_p99_us": num(self.engine.p99),
            "baseline": self.baseline,
            "baseline_p50_us": num(self.base.p50),
            "baseline_p99_us": num(self.base.p99),
            "ratio": num(self.ratio()),
            "goal": self.goal(),
            "met": self.met(),
            "samples": self.engine.n,
            "baseline_samples": self.base.n,
            "how": self.note,
            "extra": self.extra,
            "setting": setting,
        })
    }
}

fn num(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

fn fmt_us(s: Stats) -> String {
    let f = |x: f64| {
        if x < 10.0 {
            format!("{x:.3}")
        } else {
            format!("{x:.1}")
        }
    };
    format!("{} / {}", f(s.p50), f(s.p99))
}

fn engines_json(infos: &[EngineInfo]) -> Value {
    Value::Array(
        infos
            .iter()
            .map(|e| {
                json!({
                    "id": e.id,
                    "mirror_id": e.mirror_id,
                    "flushes": e.flushes,
                    "acks": e.acks,
                    "ack_p50_us": e.ack_p50_us,
                    "ack_p99_us": e.ack_p99_us,
                    "overflows": e.overflows,
                    "faults": e.faults,
                    "state": e.state,
                })
            })
            .collect(),
    )
}

/// Which way of invalidating the goal rows use (the other is shown beside them).
const PRIMARY: Way = Way::Madvise;

/// The four set-ups x ways of both modes, for the JSON.
fn invalidation_json(two: &ModeResult, one: &ModeResult) -> Value {
    let mut m = serde_json::Map::new();
    for (mode, r) in [("two_pass", two), ("one_pass", one)] {
        for (s, set) in SETS.iter().enumerate() {
            for (w, way) in WAYS.iter().enumerate() {
                let way = match way {
                    Way::Madvise => "madvise",
                    Way::Injected => "injected",
                };
                let key = format!("{mode}_m{set}_{way}");
                m.insert(
                    key,
                    json!({
                        "daemon_p50_us": num(r.daemon[s][w].p50),
                        "daemon_p99_us": num(r.daemon[s][w].p99),
                        "start_pass_p50_us": num(r.start[s][w].p50),
                        "finish_pass_p50_us": num(r.finish[s][w].p50),
                        "client_p50_us": num(r.e2e[s][w].p50),
                        "client_p99_us": num(r.e2e[s][w].p99),
                    }),
                );
            }
        }
        m.insert(format!("{mode}_engines"), engines_json(&r.engines));
        m.insert(format!("{mode}_engine_faults"), json!(r.faults));
        m.insert(
            format!("{mode}_wakeups_per_invalidation"),
            json!(r
                .wakeups
                .each_ref()
                .map(|w| w.iter().map(|x| num(*x)).collect::<Vec<_>>())),
        );
    }
    m.insert("m".into(), json!(M));
    m.insert("k".into(), json!(K));
    m.insert("range_pages".into(), json!(RANGE_PAGES));
    Value::Object(m)
}

/// Every invalidation measurement, both ways, and what the engines did.
fn print_invalidations(two: &ModeResult, one: &ModeResult) {
    println!(
        "invalidations, us p50 / p99  {:>19} {:>19} {:>19} {:>19}",
        "daemon, madvise", "daemon, injected", "client, madvise", "client, injected"
    );
    for (mode, r) in [("two-pass", two), ("one-pass", one)] {
        for (s, m) in SETS.iter().enumerate() {
            println!(
                "  {mode} M={m:<2} K={K}            {:>19} {:>19} {:>19} {:>19}",
                fmt_us(r.daemon[s][0]),
                fmt_us(r.daemon[s][1]),
                fmt_us(r.e2e[s][0]),
                fmt_us(r.e2e[s][1]),
            );
        }
    }
    println!(
        "  (daemon: start_ns + finish_ns of the trace record; client, madvise: madvise called \
         -> trace record received; client, injected: the Control::invalidate call)"
    );
    for (mode, r) in [("two-pass", two), ("one-pass", one)] {
        for (s, m) in SETS.iter().enumerate() {
            println!(
                "  {mode} M={m}: start pass / finish pass p50: madvise {:.1} / {:.1} us, \
                 injected {:.1} / {:.1} us",
                r.start[s][0].p50, r.finish[s][0].p50, r.start[s][1].p50, r.finish[s][1].p50,
            );
        }
    }
    for (mode, r) in [("two-pass", two), ("one-pass", one)] {
        for (s, m) in SETS.iter().enumerate() {
            let w: Vec<String> = r.wakeups[s].iter().map(|x| format!("{x:.1}")).collect();
            println!(
                "  {mode} M={m}: doorbell wake-ups per invalidation, per engine: {} ({m} \
                 flushes each)",
                w.join(" ")
            );
        }
        println!(
            "  {mode}: engine faults on populated pages (none expected): {}",
            r.faults
        );
        let acks: Vec<String> = r
            .engines
            .iter()
            .map(|e| format!("{}/{}", e.ack_p50_us, e.ack_p99_us))
            .collect();
        println!(
            "  {mode}: the daemon's ack waits per engine, p50/p99 us (M={M} engines, then M=1): \
             {}",
            acks.join(" ")
        );
    }
}

/// The goals of row 3 once more, on the other way of invalidating: an injected invalidation
/// runs its finish pass right after its walk on one thread, so nothing an engine does
/// between the passes can be missed by its record, which a `madvise`'s hand-off to the
/// finisher thread could. Printed so that a disagreement shows.
fn cross_check(two: &ModeResult, one: &ModeResult) {
    let other = match PRIMARY {
        Way::Madvise => Way::Injected,
        Way::Injected => Way::Madvise,
    };
    let w = WAYS.iter().position(|x| *x == other).unwrap_or(0);
    let (t16, t1, o16) = (
        two.daemon[0][w].p50,
        two.daemon[1][w].p50,
        one.daemon[0][w].p50,
    );
    let speedup = o16 / t16;
    let bound = GOAL_ACK_FACTOR * t1 + GOAL_ACK_SLACK_US;
    let yes = |b: bool| if b { "met" } else { "NOT met" };
    println!(
        "cross-check, {other:?} invalidations: one-pass/two-pass {speedup:.2} (goal >= \
         {GOAL_ONE_OVER_TWO}: {}); two-pass M={M} {t16:.1} us vs <= {bound:.1} us \
         ({GOAL_ACK_FACTOR} x single ack {t1:.1} + {GOAL_ACK_SLACK_US}: {})",
        yes(speedup >= GOAL_ONE_OVER_TWO),
        yes(t16 <= bound),
    );
}

/// The 1-minute load average, if /proc says (a busy machine makes every number worse).
fn load_average() -> Value {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Value::Null, num)
}

// ---------------------------------------------------------------------------------------

fn main() -> Res<()> {
    let quick = bench_daemon::quick_run("engine");
    let (read_iters, inv_iters, munmap_iters) = if quick {
        (300, 100, 150)
    } else {
        (5000, 2000, 2000)
    };
    let page = page_size();
    if RANGE_PAGES % M != 0 || RANGE_PAGES > memshadow::engine::TLB_ENTRIES {
        return Err("RANGE_PAGES must split into M parts and fit in an engine's TLB".into());
    }

    let BenchPaths {
        target,
        daemon: daemon_bin,
        ..
    } = BenchPaths::locate("cargo build --release --workspace --lib --bins --examples")?;
    let dir = memshadow_tests::TempDir::new("engine-bench");
    let started = Instant::now();
    eprintln!(
        "engine: {} run; {} CPUs; reads: {read_iters} samples; invalidations: {inv_iters} per \
         set-up per mode (+{WARMUP} warm-up); munmap: {munmap_iters} per way",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );

    // Rows 1, 2 and 4 on a two-pass daemon of their own (the mode plays no part in them).
    let (reads, munmap) = {
        let daemon = start_daemon(&daemon_bin, dir.path().join("reads.sock"), "two-pass")?;
        let reads = read_rows(&daemon.socket, read_iters)?;
        let munmap = munmap_row(&daemon.socket, munmap_iters, page)?;
        (reads, munmap)
    };
    let [two, one] = invalidate_rows(&daemon_bin, dir.path(), inv_iters, page)?;

    let setting = json!({
        "quick": quick,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "page_size": page,
        "engine_ack_timeout_ms": ACK_TIMEOUT_MS,
        "warmup": WARMUP,
        "load_average": load_average(),
    });
    let p = PRIMARY as usize;
    let inv_extra = invalidation_json(&two, &one);
    let inv_note = format!(
        "{}; time = the daemon's trace record of the invalidation, start_ns + finish_ns; \
         M={M} sub-mirrors + 1 whole mirror over {RANGE_PAGES} pages, K={K} engines on the \
         whole mirror, each in its own thread",
        match PRIMARY {
            Way::Madvise => "client madvise(MADV_DONTNEED) of the range",
            Way::Injected => "Control::invalidate (Clear) of the range",
        }
    );
    let rows = vec![
        reads.hit,
        reads.big,
        Row {
            op: "invalidate_m16_k4",
            engine: two.daemon[0][p],
            baseline: "one-pass daemon, same set-up",
            base: one.daemon[0][p],
            kind: RowKind::Speedup {
                min_ratio: GOAL_ONE_OVER_TWO,
            },
            note: inv_note.clone(),
            extra: inv_extra.clone(),
        },
        Row {
            op: "invalidate_m16_k4_vs_one_ack",
            engine: two.daemon[0][p],
            baseline: "slowest single ack (two-pass-batched, M=1, K=4)",
            base: two.daemon[1][p],
            kind: RowKind::Bound {
                factor: GOAL_ACK_FACTOR,
                slack_us: GOAL_ACK_SLACK_US,
            },
            note: inv_note,
            extra: inv_extra,
        },
        munmap,
    ];

    // Table.
    println!(
        "{:<29} {:>19} {:>19} {:>8} {:>17} {:>4}",
        "op", "engine_us", "baseline_us", "ratio", "goal", "met"
    );
    println!(
        "{:<29} {:>19} {:>19} {:>8} {:>17} {:>4}",
        "", "p50 / p99", "p50 / p99", "", "", ""
    );
    for r in &rows {
        println!(
            "{:<29} {:>19} {:>19} {:>8.2} {:>17} {:>4}",
            r.op,
            fmt_us(r.engine),
            fmt_us(r.base),
            r.ratio(),
            r.goal(),
            r.met().map_or("-", |m| if m { "yes" } else { "NO" }),
        );
    }
    println!();
    for r in &rows {
        println!("{}: baseline = {}; {}", r.op, r.baseline, r.note);
    }
    println!();
    print_invalidations(&two, &one);
    cross_check(&two, &one);
    let unmet: Vec<&str> = rows
        .iter()
        .filter(|r| r.met() != Some(true))
        .map(|r| r.op)
        .collect();
    if unmet.is_empty() {
        println!("all goals met");
    } else {
        println!("GOALS NOT MET: {}", unmet.join(", "));
    }

    let out_dir = target.join("memshadow-bench");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join("engine.json");
    let json_rows: Vec<Value> = rows.iter().map(|r| r.json(&setting)).collect();
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&Value::Array(json_rows))?,
    )?;
    eprintln!(
        "engine: wrote {} after {:.1} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
