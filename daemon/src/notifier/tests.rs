//! Tests of the notifier core: one per rule of docs/design.md §3 (named after it), a model-based
//! test against a naive `Vec` model, and a concurrency stress test of the reader pattern.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use super::*;

const PAGE: u64 = 0x1000;

fn r(start: u64, len: u64) -> Range {
    Range::new(start, len).unwrap()
}

fn args(start: u64, len: u64) -> InvalidateArgs {
    InvalidateArgs::new(r(start, len), Event::Unmap)
}

/// One entry of a shared call log.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Invalidate {
        tag: u32,
        seq: u64,
        event: Event,
        owner: Option<Owner>,
    },
    Start {
        tag: u32,
        seq: u64,
    },
    Finish {
        tag: u32,
        sub_seq: u64,
        active: u32,
    },
}

type Log = Arc<Mutex<Vec<Call>>>;

/// A recording notifier; `refuse` makes it refuse non-blockable ranges; `finish` decides
/// whether its start returns a finish.
struct Rec {
    tag: u32,
    log: Log,
    refuse: bool,
    finish: bool,
    sub: Subscription,
}

impl Rec {
    fn new(tag: u32, log: &Log, sub: &Subscription) -> Rec {
        Rec {
            tag,
            log: Arc::clone(log),
            refuse: false,
            finish: true,
            sub: sub.clone(),
        }
    }
}

impl OnePass for Rec {
    fn invalidate(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock> {
        if self.refuse {
            if let Some(no) = inv.refuse() {
                return Err(no);
            }
        }
        inv.set_seq();
        self.log.lock().unwrap().push(Call::Invalidate {
            tag: self.tag,
            seq: inv.seq(),
            event: inv.event(),
            owner: inv.owner(),
        });
        Ok(())
    }
}

impl TwoPass for Rec {
    type Finish = u32;

    fn invalidate_start(&self, inv: &Invalidate<'_>) -> Result<Option<u32>, WouldBlock> {
        if self.refuse {
            if let Some(no) = inv.refuse() {
                return Err(no);
            }
        }
        inv.set_seq();
        self.log.lock().unwrap().push(Call::Start {
            tag: self.tag,
            seq: inv.seq(),
        });
        Ok(self.finish.then_some(self.tag))
    }

    fn invalidate_finish(&self, tag: u32) {
        assert_eq!(tag, self.tag, "finish state belongs to its notifier");
        self.log.lock().unwrap().push(Call::Finish {
            tag,
            sub_seq: self.sub.seq(),
            active: self.sub.active(),
        });
    }
}

fn one(rec: Rec) -> Callbacks {
    Callbacks::one_pass(Arc::new(rec))
}

fn two(rec: Rec) -> Callbacks {
    Callbacks::two_pass(Arc::new(rec))
}

fn take(log: &Log) -> Vec<Call> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// Runs `f` on a thread and reports whether it is still blocked after a grace period. A
/// rule that makes it block is checked by "still blocked now" (cannot give a false failure
/// on a slow machine) followed by "returns once released" (a join, no timing).
fn spawn_flagged<F: FnOnce() + Send + 'static>(f: F) -> (Arc<AtomicBool>, thread::JoinHandle<()>) {
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let h = thread::spawn(move || {
        f();
        d.store(true, Ordering::SeqCst);
    });
    (done, h)
}

fn grace() {
    thread::sleep(Duration::from_millis(100));
}

#[test]
fn rule1_seq_is_even_when_idle_and_odd_only_while_an_overlapping_invalidation_runs() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let _h = sub
        .insert(r(0x10_000, PAGE), two(Rec::new(1, &log, &sub)))
        .unwrap();
    let idle = sub.seq();
    assert_eq!(idle % 2, 0);

    // An invalidation that overlaps nothing is counted as active but leaves the seq even.
    let miss = sub.begin_invalidate(args(0x20_000, PAGE)).unwrap();
    assert_eq!(sub.active(), 1);
    assert_eq!(sub.seq(), idle);
    assert_eq!(miss.finish().hits, 0);
    assert_eq!(sub.seq(), idle);

    let hit = sub.begin_invalidate(args(0x10_000, PAGE)).unwrap();
    assert_eq!(
        sub.seq() % 2,
        1,
        "odd while an overlapping invalidation is active"
    );
    assert_eq!(sub.active(), 1);
    hit.finish();
    assert_eq!(sub.active(), 0);
    assert!(sub.seq() > idle && sub.seq() % 2 == 0);
}

#[test]
fn rule1_lookup_is_inclusive_of_start_and_exclusive_of_end() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let _h = sub
        .insert(r(0x1000, 0x1000), one(Rec::new(1, &log, &sub)))
        .unwrap();
    assert_eq!(sub.invalidate(args(0x2000, 0x1000)).unwrap().hits, 0);
    assert_eq!(sub.invalidate(args(0x0, 0x1000)).unwrap().hits, 0);
    assert_eq!(sub.invalidate(args(0x1fff, 1)).unwrap().hits, 1);
    assert_eq!(sub.invalidate(args(0x1000, 1)).unwrap().hits, 1);
    assert_eq!(sub.invalidate(args(0x0, 0x1001)).unwrap().hits, 1);
}

#[test]
fn rule2_a_reader_that_began_before_an_invalidation_retries() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let h = sub
        .insert(r(0x1000, 0x4000), two(Rec::new(1, &log, &sub)))
        .unwrap();
    let seq = h.read_begin();
    assert!(!h.read_retry(seq));
    // An invalidation elsewhere does not disturb the reader.
    sub.invalidate(args(0x8000, PAGE)).unwrap();
    assert!(!h.read_retry(seq));
    sub.invalidate(args(0x2000, PAGE)).unwrap();
    assert!(
        h.read_retry(seq),
        "reader must retry after an overlapping invalidation"
    );
    assert!(h.check_retry(seq));
    let again = h.read_begin();
    assert!(!h.read_retry(again));
}

#[test]
fn rule2_read_begin_waits_until_every_concurrent_invalidation_has_ended() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let h = Arc::new(
        sub.insert(r(0x1000, PAGE), two(Rec::new(1, &log, &sub)))
            .unwrap(),
    );
    let a = sub.begin_invalidate(args(0x1000, PAGE)).unwrap();
    // B overlaps no notifier at all, but is concurrent: the seq only moves on when it ends.
    let b = sub.begin_invalidate(args(0x9000, PAGE)).unwrap();
    assert_eq!(h.try_read_begin(), None);
    let h2 = Arc::clone(&h);
    let seen = Arc::new(AtomicU64::new(0));
    let seen2 = Arc::clone(&seen);
    let (done, join) = spawn_flagged(move || {
        let s = h2.read_begin();
        seen2.store(s, Ordering::SeqCst);
    });
    grace();
    assert!(
        !done.load(Ordering::SeqCst),
        "read_begin returned during an invalidation"
    );
    a.finish();
    grace();
    assert!(
        !done.load(Ordering::SeqCst),
        "read_begin returned while a concurrent invalidation was still active"
    );
    b.finish();
    join.join().unwrap();
    let s = seen.load(Ordering::SeqCst);
    assert!(!h.read_retry(s), "nothing invalidated it after the wait");
    assert_eq!(h.try_read_begin(), Some(s));
}

#[test]
fn rule3_every_callback_of_one_invalidation_sees_and_records_the_same_odd_seq() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let hs = [
        sub.insert(r(0x1000, PAGE), one(Rec::new(1, &log, &sub)))
            .unwrap(),
        sub.insert(r(0x2000, PAGE), two(Rec::new(2, &log, &sub)))
            .unwrap(),
        sub.insert(r(0x1800, 0x2000), two(Rec::new(3, &log, &sub)))
            .unwrap(),
    ];
    let before: Vec<u64> = hs.iter().map(|h| h.read_begin()).collect();
    // Two concurrent invalidations share the seq too.
    let first = sub.begin_invalidate(args(0x1000, PAGE)).unwrap();
    let second = sub.begin_invalidate(args(0x2000, 0x2000)).unwrap();
    assert_eq!(first.summary().seq, second.summary().seq);
    let seq = first.summary().seq;
    assert_eq!(seq % 2, 1);
    drop(first);
    drop(second);
    for call in take(&log) {
        match call {
            Call::Invalidate { seq: s, .. } | Call::Start { seq: s, .. } => assert_eq!(s, seq),
            Call::Finish { .. } => {}
        }
    }
    for (h, b) in hs.iter().zip(before) {
        assert_eq!(h.seq(), seq, "set_seq recorded in the notifier");
        assert!(h.read_retry(b));
    }
}

#[test]
fn rule4_insert_during_an_invalidation_is_deferred_and_its_readers_wait() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let _a = sub
        .insert(r(0x1000, PAGE), two(Rec::new(1, &log, &sub)))
        .unwrap();
    let inv = sub.begin_invalidate(args(0x0, 0x10_000)).unwrap();
    let late = sub
        .insert(r(0x4000, PAGE), one(Rec::new(2, &log, &sub)))
        .unwrap();
    assert_eq!(late.state(), "pending-insert");
    assert_eq!(sub.len(), 1, "not in the tree yet");
    assert_eq!(
        late.try_read_begin(),
        None,
        "a deferred notifier's readers wait"
    );
    // A concurrent invalidation does not see the deferred notifier.
    assert_eq!(sub.invalidate(args(0x4000, PAGE)).unwrap().hits, 0);
    let late = Arc::new(late);
    let late2 = Arc::clone(&late);
    let (done, join) = spawn_flagged(move || {
        late2.read_begin();
    });
    grace();
    assert!(!done.load(Ordering::SeqCst));
    inv.finish();
    join.join().unwrap();
    assert_eq!(late.state(), "active");
    assert_eq!(sub.len(), 2);
    take(&log);
    assert_eq!(sub.invalidate(args(0x4000, PAGE)).unwrap().hits, 1);
    assert!(matches!(take(&log)[..], [Call::Invalidate { tag: 2, .. }]));
}

#[test]
fn rule4_remove_during_an_invalidation_is_deferred_and_waits_for_it() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let h = Arc::new(
        sub.insert(r(0x1000, PAGE), two(Rec::new(1, &log, &sub)))
            .unwrap(),
    );
    let inv = sub.begin_invalidate(args(0x1000, PAGE)).unwrap();
    let h2 = Arc::clone(&h);
    let (done, join) = spawn_flagged(move || h2.remove().unwrap());
    grace();
    assert!(
        !done.load(Ordering::SeqCst),
        "remove returned while its notifier could still be called"
    );
    assert_eq!(sub.len(), 1, "removal is deferred");
    inv.finish();
    join.join().unwrap();
    assert_eq!(h.state(), "removed");
    assert_eq!(sub.len(), 0);
    assert_eq!(h.remove(), Err(NotifierError::AlreadyRemoved));
    // The finish of the in-flight invalidation ran before remove returned.
    assert!(take(&log)
        .iter()
        .any(|c| matches!(c, Call::Finish { tag: 1, .. })));
}

#[test]
fn rule4_removing_a_pending_insert_never_reaches_the_tree() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let inv = sub.begin_invalidate(args(0, PAGE)).unwrap();
    let h = sub
        .insert(r(0x1000, PAGE), one(Rec::new(1, &log, &sub)))
        .unwrap();
    h.remove().unwrap();
    inv.finish();
    assert_eq!(sub.len(), 0);
    assert_eq!(sub.invalidate(args(0x1000, PAGE)).unwrap().hits, 0);
    assert!(take(&log).is_empty());
}

/// Removes itself from inside its own callback: must be refused, not deadlock.
struct SelfRemover {
    handle: OnceLock<NotifierHandle>,
    result: Mutex<Option<Result<(), NotifierError>>>,
}

impl OnePass for SelfRemover {
    fn invalidate(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock> {
        inv.set_seq();
        if let Some(h) = self.handle.get() {
            *self.result.lock().unwrap() = Some(h.remove());
        }
        Ok(())
    }
}

#[test]
fn rule4_remove_from_a_callback_is_refused() {
    let sub = Subscription::new();
    let n = Arc::new(SelfRemover {
        handle: OnceLock::new(),
        result: Mutex::new(None),
    });
    let h = sub
        .insert(r(0x1000, PAGE), Callbacks::one_pass(Arc::clone(&n)))
        .unwrap();
    assert!(n.handle.set(h).is_ok());
    sub.invalidate(args(0x1000, PAGE)).unwrap();
    assert_eq!(
        *n.result.lock().unwrap(),
        Some(Err(NotifierError::RemoveFromCallback))
    );
    assert_eq!(sub.len(), 1);
}

/// Counts calls and flags any that happen after its remover said removal returned.
struct Tripwire {
    removed: AtomicBool,
    calls: AtomicUsize,
    late_calls: Arc<AtomicUsize>,
}

impl OnePass for Tripwire {
    fn invalidate(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock> {
        inv.set_seq();
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.removed.load(Ordering::SeqCst) {
            self.late_calls.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[test]
fn rule4_no_callback_runs_after_remove_returns() {
    let sub = Subscription::new();
    let stop = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicUsize::new(0));
    let invalidators: Vec<_> = (0..2)
        .map(|i| {
            let sub = sub.clone();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Alternate plain and split invalidations so removals land mid-walk.
                    let inv = sub.begin_invalidate(args(0, 0x100_000)).unwrap();
                    if (n + i) % 2 == 0 {
                        thread::yield_now();
                    }
                    inv.finish();
                    n += 1;
                }
            })
        })
        .collect();
    let mut total_calls = 0;
    for _ in 0..2000 {
        let t = Arc::new(Tripwire {
            removed: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            late_calls: Arc::clone(&late),
        });
        let h = sub
            .insert(r(0x1000, PAGE), Callbacks::one_pass(Arc::clone(&t)))
            .unwrap();
        // Let an invalidation reach it (bounded: the test asserts overlap happened at all).
        for _ in 0..1000 {
            if t.calls.load(Ordering::SeqCst) > 0 {
                break;
            }
            thread::yield_now();
        }
        h.remove().unwrap();
        t.removed.store(true, Ordering::SeqCst);
        total_calls += t.calls.load(Ordering::SeqCst);
    }
    stop.store(true, Ordering::Relaxed);
    for i in invalidators {
        i.join().unwrap();
    }
    assert_eq!(
        late.load(Ordering::SeqCst),
        0,
        "a callback ran after remove returned"
    );
    assert!(
        total_calls > 0,
        "the test never overlapped an invalidation with a notifier"
    );
}

#[test]
fn rule5_a_start_without_a_finish_acts_as_a_full_invalidation() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let mut rec = Rec::new(1, &log, &sub);
    rec.finish = false;
    let h = sub.insert(r(0x1000, PAGE), two(rec)).unwrap();
    let seq = h.read_begin();
    let s = sub.invalidate(args(0x1000, PAGE)).unwrap();
    assert_eq!((s.hits, s.started, s.finished), (1, 0, 0));
    assert!(h.read_retry(seq));
    assert!(matches!(take(&log)[..], [Call::Start { tag: 1, .. }]));
}

#[test]
fn rule6_finishes_run_after_the_walk_in_start_order_inside_the_odd_window() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    // Inserted out of address order; the walk goes by address.
    for (tag, start) in [(3u32, 0x3000u64), (1, 0x1000), (4, 0x4000), (2, 0x2000)] {
        let cb = if tag == 4 {
            one(Rec::new(tag, &log, &sub))
        } else {
            two(Rec::new(tag, &log, &sub))
        };
        std::mem::forget(sub.insert(r(start, PAGE), cb).unwrap());
    }
    let s = sub.invalidate(args(0, 0x10_000)).unwrap();
    assert_eq!((s.hits, s.one_pass, s.started, s.finished), (4, 1, 3, 3));
    let calls = take(&log);
    let order: Vec<(char, u32)> = calls
        .iter()
        .map(|c| match c {
            Call::Start { tag, .. } => ('s', *tag),
            Call::Invalidate { tag, .. } => ('i', *tag),
            Call::Finish {
                tag,
                sub_seq,
                active,
            } => {
                assert_eq!(sub_seq % 2, 1, "finish runs while the seq is still odd");
                assert_eq!(*active, 1, "finish runs before the invalidation ends");
                ('f', *tag)
            }
        })
        .collect();
    assert_eq!(
        order,
        vec![
            ('s', 1),
            ('s', 2),
            ('s', 3),
            ('i', 4),
            ('f', 1),
            ('f', 2),
            ('f', 3)
        ]
    );
}

#[test]
fn rule6_a_split_invalidation_finishes_on_another_thread_and_cannot_be_lost() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let h = sub
        .insert(r(0x1000, PAGE), two(Rec::new(1, &log, &sub)))
        .unwrap();
    let inv = sub.begin_invalidate(args(0x1000, PAGE)).unwrap();
    assert_eq!(h.try_read_begin(), None);
    assert_eq!(sub.seq() % 2, 1);
    let (tx, rx) = mpsc::channel();
    let finisher = thread::spawn(move || {
        let inv: Invalidation = rx.recv().unwrap();
        inv.finish()
    });
    tx.send(inv).unwrap();
    let s = finisher.join().unwrap();
    assert_eq!((s.started, s.finished), (1, 1));
    assert_eq!(sub.seq() % 2, 0);
    // Dropping a handle runs its finish pass.
    let inv = sub.begin_invalidate(args(0x1000, PAGE)).unwrap();
    take(&log);
    drop(inv);
    assert!(matches!(take(&log)[..], [Call::Finish { tag: 1, .. }]));
    assert_eq!(sub.active(), 0);
}

#[test]
fn rule7_a_refusal_finishes_the_started_notifiers_and_ends_the_invalidation() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let _a = sub
        .insert(r(0x1000, PAGE), two(Rec::new(1, &log, &sub)))
        .unwrap();
    let mut refuser = Rec::new(2, &log, &sub);
    refuser.refuse = true;
    let _b = sub.insert(r(0x2000, PAGE), two(refuser)).unwrap();
    let _c = sub
        .insert(r(0x3000, PAGE), two(Rec::new(3, &log, &sub)))
        .unwrap();
    let before = sub.seq();
    let err = sub
        .invalidate(args(0x0, 0x10_000).non_blockable())
        .unwrap_err();
    let InvalidateError::WouldBlock(s) = err else {
        panic!("expected WouldBlock, got {err:?}")
    };
    assert!(s.refused);
    assert_eq!((s.hits, s.started, s.finished), (1, 1, 1));
    assert_eq!(
        take(&log).len(),
        2,
        "start and finish of notifier 1 only: {s:?}"
    );
    assert_eq!(sub.active(), 0, "ended at once");
    assert!(
        sub.seq() > before && sub.seq() % 2 == 0,
        "seq consistent (even) after EAGAIN"
    );
    // The same range, blockable, goes through every notifier.
    assert_eq!(sub.invalidate(args(0x0, 0x10_000)).unwrap().hits, 3);
}

#[test]
fn rule7_on_a_blockable_range_a_callback_cannot_refuse() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let mut refuser = Rec::new(1, &log, &sub);
    refuser.refuse = true;
    let _h = sub.insert(r(0x1000, PAGE), one(refuser)).unwrap();
    let s = sub.invalidate(args(0x1000, PAGE)).unwrap();
    assert_eq!(s.hits, 1);
    assert!(!s.refused);
}

#[test]
fn rule8_release_invalidates_the_whole_address_space_then_frees_everything() {
    let sub = Subscription::new();
    let log: Log = Log::default();
    let handles = [
        sub.insert(r(0, PAGE), one(Rec::new(1, &log, &sub)))
            .unwrap(),
        sub.insert(r(0x7fff_0000_0000, PAGE), two(Rec::new(2, &log, &sub)))
            .unwrap(),
        sub.insert(r(u64::MAX - PAGE + 1, PAGE), two(Rec::new(3, &log, &sub)))
            .unwrap(),
    ];
    // Release waits for an invalidation in flight.
    let inv = sub.begin_invalidate(args(0x7fff_0000_0000, PAGE)).unwrap();
    let sub2 = sub.clone();
    let (done, join) = spawn_flagged(move || {
        let s = sub2.release().unwrap();
        assert_eq!((s.hits, s.started, s.finished), (3, 2, 2));
    });
    grace();
    assert!(
        !done.load(Ordering::SeqCst),
        "release ran over an invalidation in flight"
    );
    take(&log);
    inv.finish();
    join.join().unwrap();
    let calls = take(&log);
    // The in-flight invalidation's finish comes first, then release's walk and finishes.
    let at = calls
        .iter()
        .position(|c| {
            matches!(
                c,
                Call::Invalidate {
                    tag: 1,
                    event: Event::Release,
                    ..
                }
            )
        })
        .expect("release reached the one-pass notifier");
    assert!(
        matches!(calls[..at], [Call::Finish { tag: 2, .. }]),
        "{calls:?}"
    );
    assert_eq!(
        calls[at..]
            .iter()
            .filter(|c| matches!(c, Call::Finish { .. }))
            .count(),
        2
    );
    assert_eq!(sub.len(), 0);
    for h in &handles {
        assert_eq!(h.state(), "removed");
        assert_eq!(h.remove(), Err(NotifierError::AlreadyRemoved));
    }
    assert_eq!(
        sub.insert(r(0, PAGE), one(Rec::new(9, &log, &sub)))
            .unwrap_err(),
        NotifierError::Released
    );
    assert_eq!(
        sub.invalidate(args(0, PAGE)).unwrap_err(),
        InvalidateError::Released
    );
    assert_eq!(sub.release().unwrap_err(), InvalidateError::Released);
}

/// Skips invalidations it caused itself (rule 9's owner).
struct OwnerAware {
    me: Owner,
    seen: Mutex<Vec<(Event, Option<Owner>)>>,
}

impl OnePass for OwnerAware {
    fn invalidate(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock> {
        inv.set_seq();
        if inv.owner() != Some(self.me) {
            self.seen.lock().unwrap().push((inv.event(), inv.owner()));
        }
        Ok(())
    }
}

#[test]
fn rule9_event_kind_and_owner_reach_every_callback() {
    let sub = Subscription::new();
    let n = Arc::new(OwnerAware {
        me: Owner(7),
        seen: Mutex::new(Vec::new()),
    });
    let _h = sub
        .insert(r(0x1000, PAGE), Callbacks::one_pass(Arc::clone(&n)))
        .unwrap();
    for e in Event::ALL.into_iter().filter(|e| *e != Event::Release) {
        sub.invalidate(InvalidateArgs::new(r(0x1000, PAGE), e))
            .unwrap();
    }
    sub.invalidate(args(0x1000, PAGE).with_owner(Owner(7)))
        .unwrap();
    sub.invalidate(args(0x1000, PAGE).with_owner(Owner(8)))
        .unwrap();
    sub.release().unwrap();
    let seen = n.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (Event::Unmap, None),
            (Event::Clear, None),
            (Event::ProtectionVma, None),
            (Event::ProtectionPage, None),
            (Event::SoftDirty, None),
            (Event::Unmap, Some(Owner(8))),
            (Event::Release, None),
        ]
    );
}

mod model {
    //! Model-based test: random operations on the core and on a naive `Vec`-scan model of the
    //! same semantics must agree on every observable.

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert {
            page: u64,
            pages: u64,
            two_pass: bool,
            refuses: bool,
        },
        Remove {
            idx: usize,
        },
        Invalidate {
            page: u64,
            pages: u64,
            blockable: bool,
        },
        Begin {
            page: u64,
            pages: u64,
        },
        Finish {
            idx: usize,
        },
        ReadBegin {
            idx: usize,
        },
        ReadRetry {
            idx: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u64..32, 1u64..8, any::<bool>(), prop::bool::weighted(0.2))
                .prop_map(|(page, pages, two_pass, refuses)| Op::Insert { page, pages, two_pass, refuses }),
            1 => any::<usize>().prop_map(|idx| Op::Remove { idx }),
            3 => (0u64..40, 1u64..12, prop::bool::weighted(0.7))
                .prop_map(|(page, pages, blockable)| Op::Invalidate { page, pages, blockable }),
            1 => (0u64..40, 1u64..12).prop_map(|(page, pages)| Op::Begin { page, pages }),
            1 => any::<usize>().prop_map(|idx| Op::Finish { idx }),
            2 => any::<usize>().prop_map(|idx| Op::ReadBegin { idx }),
            2 => any::<usize>().prop_map(|idx| Op::ReadRetry { idx }),
        ]
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum St {
        Pending,
        InTree,
        Removed,
    }

    struct MNode {
        id: u64,
        range: Range,
        seq: u64,
        st: St,
        refuses: bool,
        read_seq: Option<u64>,
    }

    #[derive(Default)]
    struct Model {
        nodes: Vec<MNode>,
        seq: u64,
        active: u32,
        deferred: Vec<(bool, u64)>, // (insert?, id)
    }

    impl Model {
        fn end(&mut self) {
            self.active -= 1;
            if self.active == 0 {
                if self.seq & 1 == 1 {
                    self.seq += 1;
                }
                for (insert, id) in std::mem::take(&mut self.deferred) {
                    let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
                    n.st = if insert { St::InTree } else { St::Removed };
                }
            }
        }

        /// Starts an invalidation; returns (called ids in walk order, seq, refused).
        fn start(&mut self, range: Range, blockable: bool) -> (Vec<u64>, u64, bool) {
            self.active += 1;
            let mut hits: Vec<&mut MNode> = self
                .nodes
                .iter_mut()
                .filter(|n| n.st == St::InTree && n.range.overlaps(&range))
                .collect();
            hits.sort_by_key(|n| (n.range.start(), n.id));
            if !hits.is_empty() {
                self.seq |= 1;
            }
            let seq = self.seq;
            let mut called = Vec::new();
            for n in hits {
                if !blockable && n.refuses {
                    return (called, seq, true);
                }
                n.seq = seq;
                called.push(n.id);
            }
            (called, seq, false)
        }
    }

    /// Logs the ids it is called with.
    struct Logger {
        id: OnceLock<u64>,
        refuses: bool,
        log: Arc<Mutex<Vec<u64>>>,
    }

    impl Logger {
        fn call(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock> {
            if self.refuses {
                if let Some(no) = inv.refuse() {
                    return Err(no);
                }
            }
            inv.set_seq();
            self.log.lock().unwrap().push(inv.notifier_id());
            Ok(())
        }
    }

    impl OnePass for Logger {
        fn invalidate(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock> {
            self.call(inv)
        }
    }

    impl TwoPass for Logger {
        type Finish = u64;
        fn invalidate_start(&self, inv: &Invalidate<'_>) -> Result<Option<u64>, WouldBlock> {
            self.call(inv)?;
            Ok(Some(inv.notifier_id()))
        }
        fn invalidate_finish(&self, id: u64) {
            assert_eq!(Some(&id), self.id.get());
        }
    }

    fn range(page: u64, pages: u64) -> Range {
        r(page * PAGE, pages * PAGE)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn core_agrees_with_a_naive_model(ops in prop::collection::vec(op(), 1..120)) {
            let sub = Subscription::new();
            let log = Arc::new(Mutex::new(Vec::new()));
            let mut model = Model { seq: sub.seq(), ..Model::default() };
            let mut handles: Vec<NotifierHandle> = Vec::new();
            let mut open: Vec<(Invalidation, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert { page, pages, two_pass, refuses } => {
                        let l = Arc::new(Logger { id: OnceLock::new(), refuses, log: Arc::clone(&log) });
                        let cb = if two_pass { Callbacks::two_pass(Arc::clone(&l)) } else { Callbacks::one_pass(Arc::clone(&l)) };
                        let h = sub.insert(range(page, pages), cb).unwrap();
                        l.id.set(h.id()).unwrap();
                        let (seq, st) = if model.active > 0 {
                            model.seq |= 1;
                            model.deferred.push((true, h.id()));
                            (model.seq, St::Pending)
                        } else {
                            (model.seq - 1, St::InTree)
                        };
                        model.nodes.push(MNode { id: h.id(), range: range(page, pages), seq, st, refuses, read_seq: None });
                        handles.push(h);
                    }
                    Op::Remove { idx } if !handles.is_empty() => {
                        let i = idx % handles.len();
                        let m = &mut model.nodes[i];
                        match m.st {
                            // Would block until the open invalidations end: not for one thread.
                            St::InTree if model.active > 0 => continue,
                            St::InTree | St::Pending => {
                                prop_assert_eq!(handles[i].remove(), Ok(()));
                                let id = m.id;
                                m.st = St::Removed;
                                model.deferred.retain(|&(_, d)| d != id);
                            }
                            St::Removed => prop_assert_eq!(handles[i].remove(), Err(NotifierError::AlreadyRemoved)),
                        }
                    }
                    Op::Invalidate { page, pages, blockable } => {
                        let mut a = InvalidateArgs::new(range(page, pages), Event::Clear);
                        if !blockable { a = a.non_blockable(); }
                        let (want, seq, refused) = model.start(a.range, blockable);
                        model.end();
                        let got = sub.invalidate(a);
                        let called = std::mem::take(&mut *log.lock().unwrap());
                        prop_assert_eq!(&called, &want);
                        match got {
                            Ok(s) => { prop_assert!(!refused); prop_assert_eq!(s.seq, seq); prop_assert_eq!(s.hits as usize, want.len()); }
                            Err(InvalidateError::WouldBlock(s)) => { prop_assert!(refused); prop_assert_eq!(s.seq, seq); }
                            Err(e) => prop_assert!(false, "unexpected {:?}", e),
                        }
                    }
                    Op::Begin { page, pages } => {
                        let (want, seq, _) = model.start(range(page, pages), true);
                        let inv = sub.begin_invalidate(InvalidateArgs::new(range(page, pages), Event::Unmap)).unwrap();
                        let called = std::mem::take(&mut *log.lock().unwrap());
                        prop_assert_eq!(&called, &want);
                        prop_assert_eq!(inv.summary().seq, seq);
                        open.push((inv, seq));
                    }
                    Op::Finish { idx } if !open.is_empty() => {
                        let (inv, _) = open.remove(idx % open.len());
                        inv.finish();
                        model.end();
                    }
                    Op::ReadBegin { idx } if !handles.is_empty() => {
                        let i = idx % handles.len();
                        let m = &mut model.nodes[i];
                        let want = (m.seq != model.seq).then_some(m.seq);
                        let got = handles[i].try_read_begin();
                        prop_assert_eq!(got, want);
                        if got.is_some() { m.read_seq = got; }
                    }
                    Op::ReadRetry { idx } if !handles.is_empty() => {
                        let i = idx % handles.len();
                        if let Some(s) = model.nodes[i].read_seq {
                            prop_assert_eq!(handles[i].read_retry(s), model.nodes[i].seq != s);
                        }
                    }
                    _ => {}
                }
                prop_assert_eq!(sub.seq(), model.seq);
                prop_assert_eq!(sub.active(), model.active);
                prop_assert_eq!(sub.len(), model.nodes.iter().filter(|n| n.st == St::InTree).count());
                for (h, m) in handles.iter().zip(&model.nodes) {
                    prop_assert_eq!(h.seq(), m.seq);
                }
            }
            for (inv, _) in open.drain(..) {
                inv.finish();
                model.end();
            }
            prop_assert_eq!(sub.seq(), model.seq);
            prop_assert_eq!(sub.seq() % 2, 0);
        }
    }
}

mod stress {
    //! Concurrency stress of rules 2, 3, 4 and 6: invalidators (some pipelined, finishing on
    //! another thread) change "CPU pages" inside their odd window while readers run the
    //! read_begin / copy / lock / read_retry / install loop, and a checker asserts under the
    //! device lock that no installed value is older than the page it mirrors.

    use super::*;
    use crossbeam_channel::unbounded;

    const PAGES: usize = 64;

    struct World {
        /// The "CPU" contents of each page: a version number.
        src: Vec<AtomicU64>,
        /// The device lock and the device table it protects.
        dev: Mutex<Vec<Option<u64>>>,
        violations: AtomicUsize,
        finishes: AtomicUsize,
    }

    impl World {
        fn check_locked(&self, dev: &[Option<u64>]) {
            for (p, v) in dev.iter().enumerate() {
                if let Some(v) = v {
                    if *v != self.src[p].load(Ordering::SeqCst) {
                        self.violations.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
    }

    /// A device notifier over pages `first..first+count`: zaps them under the device lock.
    struct DevNotifier {
        world: Arc<World>,
        two_pass: bool,
    }

    impl DevNotifier {
        fn zap(&self, inv: &Invalidate<'_>) {
            let mut dev = self.world.dev.lock().unwrap();
            inv.set_seq();
            let a = inv.affected();
            for p in a.start() / PAGE..=a.last() / PAGE {
                dev[p as usize] = None;
            }
        }
    }

    impl OnePass for DevNotifier {
        fn invalidate(&self, inv: &Invalidate<'_>) -> Result<(), WouldBlock> {
            self.zap(inv);
            Ok(())
        }
    }

    impl TwoPass for DevNotifier {
        type Finish = ();
        fn invalidate_start(&self, inv: &Invalidate<'_>) -> Result<Option<()>, WouldBlock> {
            self.zap(inv);
            Ok(self.two_pass.then_some(()))
        }
        fn invalidate_finish(&self, (): ()) {
            self.world.finishes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn iterations() -> u64 {
        std::env::var("MEMSHADOW_STRESS_ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3000)
    }

    #[test]
    fn stress_no_reader_installs_a_value_older_than_an_invalidation_that_covered_it() {
        let world = Arc::new(World {
            src: (0..PAGES).map(|_| AtomicU64::new(0)).collect(),
            dev: Mutex::new(vec![None; PAGES]),
            violations: AtomicUsize::new(0),
            finishes: AtomicUsize::new(0),
        });
        let sub = Subscription::new();
        // Primary notifiers: 8 pages each, alternating one- and two-pass; plus overlapping
        // extra notifiers so pages are covered twice.
        let mut primary = Vec::new();
        for i in 0..PAGES / 8 {
            let n = Arc::new(DevNotifier {
                world: Arc::clone(&world),
                two_pass: true,
            });
            let cb = if i % 2 == 0 {
                Callbacks::two_pass(n)
            } else {
                Callbacks::one_pass(n)
            };
            primary.push(sub.insert(r(i as u64 * 8 * PAGE, 8 * PAGE), cb).unwrap());
        }
        for i in 0..PAGES / 8 - 1 {
            let n = Arc::new(DevNotifier {
                world: Arc::clone(&world),
                two_pass: i % 2 == 0,
            });
            std::mem::forget(
                sub.insert(
                    r((i as u64 * 8 + 4) * PAGE, 8 * PAGE),
                    Callbacks::two_pass(n),
                )
                .unwrap(),
            );
        }
        let primary = Arc::new(primary);
        let iters = iterations();
        let stop = Arc::new(AtomicBool::new(false));
        let retries = Arc::new(AtomicU64::new(0));
        let installs = Arc::new(AtomicU64::new(0));

        // Pipelined invalidations finish on this thread, like the daemon's finisher.
        let (fin_tx, fin_rx) = unbounded::<Invalidation>();
        let finisher = thread::spawn(move || {
            for inv in fin_rx {
                thread::yield_now();
                inv.finish();
            }
        });

        let invalidators: Vec<_> = (0..2u64)
            .map(|t| {
                let (sub, world, fin_tx) = (sub.clone(), Arc::clone(&world), fin_tx.clone());
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let first = x % PAGES as u64;
                        let count = 1 + (x >> 8) % 12;
                        let count = count.min(PAGES as u64 - first);
                        let inv = sub
                            .begin_invalidate(InvalidateArgs::new(
                                r(first * PAGE, count * PAGE),
                                Event::Clear,
                            ))
                            .unwrap();
                        // The CPU changes the pages inside the odd window, after the start pass,
                        // sometimes after a pause so other invalidations can end meanwhile.
                        for _ in 0..(x >> 62) {
                            thread::yield_now();
                        }
                        for p in first..first + count {
                            world.src[p as usize].fetch_add(1, Ordering::SeqCst);
                        }
                        if i % 2 == 0 {
                            fin_tx.send(inv).unwrap();
                        } else {
                            inv.finish();
                        }
                        thread::yield_now();
                    }
                })
            })
            .collect();
        drop(fin_tx);

        let readers: Vec<_> = (0..2u64)
            .map(|t| {
                let (world, primary) = (Arc::clone(&world), Arc::clone(&primary));
                let (retries, installs) = (Arc::clone(&retries), Arc::clone(&installs));
                thread::spawn(move || {
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ (t << 32);
                    for _ in 0..iters {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let p = (x % PAGES as u64) as usize;
                        let h = &primary[p / 8];
                        loop {
                            let seq = h.read_begin();
                            let copied = world.src[p].load(Ordering::SeqCst);
                            // Widen the copy window so invalidations land inside it.
                            for _ in 0..(x >> 62) {
                                thread::yield_now();
                            }
                            let mut dev = world.dev.lock().unwrap();
                            if h.read_retry(seq) {
                                retries.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            dev[p] = Some(copied);
                            installs.fetch_add(1, Ordering::Relaxed);
                            world.check_locked(&dev);
                            break;
                        }
                    }
                })
            })
            .collect();

        for rd in readers {
            rd.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for i in invalidators {
            i.join().unwrap();
        }
        finisher.join().unwrap();
        world.check_locked(&world.dev.lock().unwrap());
        assert_eq!(
            world.violations.load(Ordering::SeqCst),
            0,
            "a reader installed a stale value"
        );
        assert_eq!(sub.active(), 0);
        assert_eq!(sub.seq() % 2, 0);
        assert!(installs.load(Ordering::Relaxed) > 0);
        assert!(
            retries.load(Ordering::Relaxed) > 0,
            "the stress never made a reader retry"
        );
        assert!(world.finishes.load(Ordering::Relaxed) > 0);
        eprintln!(
            "stress: {} installs, {} retries",
            installs.load(Ordering::Relaxed),
            retries.load(Ordering::Relaxed)
        );
    }
}

/// One `ended` call: event, range, summary, mark.
type Ended = (Event, Range, Summary, [u64; 2]);

/// Records what an observer saw.
#[derive(Default)]
struct Seen {
    began: AtomicUsize,
    ended: Mutex<Vec<Ended>>,
    interested: AtomicBool,
}

impl Observer for Seen {
    fn began(&self, _args: &InvalidateArgs) -> Option<[u64; 2]> {
        let n = self.began.fetch_add(1, Ordering::SeqCst) as u64;
        self.interested
            .load(Ordering::SeqCst)
            .then_some([n, n + 100])
    }

    fn ended(&self, args: &InvalidateArgs, summary: &Summary, mark: [u64; 2]) {
        self.ended
            .lock()
            .unwrap()
            .push((args.event, args.range, *summary, mark));
    }
}

#[test]
fn the_observer_sees_every_invalidation_end_with_its_summary() {
    let sub = Subscription::new();
    let seen = Arc::new(Seen::default());
    assert!(sub.set_observer(seen.clone()));
    assert!(!sub.set_observer(Arc::new(Seen::default())), "only one");
    let log: Log = Log::default();
    let _a = sub
        .insert(r(0x1000, PAGE), two(Rec::new(1, &log, &sub)))
        .unwrap();
    let mut refuser = Rec::new(2, &log, &sub);
    refuser.refuse = true;
    let _b = sub.insert(r(0x2000, PAGE), two(refuser)).unwrap();
    // Not interested: began is asked, ended is not called.
    sub.invalidate(args(0x1000, PAGE)).unwrap();
    assert_eq!(seen.began.load(Ordering::SeqCst), 1);
    assert!(seen.ended.lock().unwrap().is_empty());
    seen.interested.store(true, Ordering::SeqCst);
    // A two-pass invalidation finished on another thread.
    let inv = sub
        .begin_invalidate(InvalidateArgs::new(r(0x1000, PAGE), Event::Clear))
        .unwrap();
    thread::spawn(move || inv.finish()).join().unwrap();
    // A refusal.
    let _ = sub.invalidate(args(0x0, 0x10_000).non_blockable());
    // Release.
    sub.release().unwrap();
    let ended = seen.ended.lock().unwrap().clone();
    assert_eq!(ended.len(), 3, "{ended:?}");
    assert_eq!(
        (ended[0].0, ended[0].1, ended[0].2.hits, ended[0].3),
        (Event::Clear, r(0x1000, PAGE), 1, [1, 101])
    );
    assert_eq!(ended[0].2.finished, 1);
    assert!(ended[1].2.refused && ended[1].0 == Event::Unmap);
    assert_eq!(ended[2].0, Event::Release);
    assert_eq!(ended[2].2.hits, 2);
}
