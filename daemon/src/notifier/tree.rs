//! An augmented AVL interval tree (docs/design.md §3 rule 1: lookup in O(log n + hits)).
//!
//! Written here rather than taken from a crate because the notifier core needs three things
//! together that the interval crates we looked at do not offer at once: removal of one
//! specific entry among several with the same range, an in-order (by start) visit of the
//! overlapping entries that can stop early and allocates nothing, and `Clone` so that a
//! walker can hold a snapshot cheaply (see `subscription.rs`). Nodes live in an arena
//! (`Vec`) and link by index; each node keeps the largest `last` of its subtree so a query
//! skips every subtree that ends before the queried range starts.

use std::cmp::Ordering;
use std::ops::ControlFlow;

use super::range::Range;

const NIL: u32 = u32::MAX;
/// An AVL tree of n nodes is at most 1.44·log2(n+2) high; 64 covers any arena we can index.
const MAX_HEIGHT: usize = 64;

/// Key of an entry: its range and a caller-chosen id that makes equal ranges distinct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    start: u64,
    id: u64,
}

impl Key {
    fn cmp(&self, other: &Key) -> Ordering {
        (self.start, self.id).cmp(&(other.start, other.id))
    }
}

/// One arena entry, aligned to a cache line so a visit touches one line, not two.
#[derive(Clone, Debug)]
#[repr(align(64))]
struct Node<V> {
    key: Key,
    last: u64,
    /// Largest `last` in this node's subtree.
    max_last: u64,
    left: u32,
    right: u32,
    height: u8,
    value: Option<V>,
}

/// An interval tree mapping `(range, id)` to `V`.
#[derive(Clone, Debug)]
pub(crate) struct IntervalTree<V> {
    nodes: Vec<Node<V>>,
    free: Vec<u32>,
    root: u32,
    len: usize,
    /// Inserts and removes since the arena was last laid out in tree order.
    churn: usize,
}

impl<V> Default for IntervalTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> IntervalTree<V> {
    /// An empty tree.
    pub(crate) fn new() -> Self {
        IntervalTree {
            nodes: Vec::new(),
            free: Vec::new(),
            root: NIL,
            len: 0,
            churn: 0,
        }
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Inserts `value` under `(range, id)`. The caller keeps ids unique.
    pub(crate) fn insert(&mut self, range: Range, id: u64, value: V) {
        let key = Key {
            start: range.start(),
            id,
        };
        let node = Node {
            key,
            last: range.last(),
            max_last: range.last(),
            left: NIL,
            right: NIL,
            height: 1,
            value: Some(value),
        };
        let idx = match self.free.pop() {
            Some(idx) => {
                self.nodes[idx as usize] = node;
                idx
            }
            None => {
                self.nodes.push(node);
                u32::try_from(self.nodes.len() - 1)
                    .expect("interval tree arena exceeds u32 indices")
            }
        };
        self.root = self.insert_at(self.root, idx);
        self.len += 1;
        self.changed();
    }

    /// Counts a change; once the tree has changed a quarter as many times as it has
    /// entries, lays the arena out again. Amortised, that is 4 node moves per change; the
    /// price is one O(n) pass (a few ms at 100k entries) every n/4 changes, paid by the
    /// insert or remove that crosses the line (under the subscription's lock).
    fn changed(&mut self) {
        self.churn += 1;
        if self.churn >= self.len.max(256) / 4 {
            self.relayout();
        }
    }

    /// Lays the arena out in preorder, so a node's left child is the next cache line and a
    /// subtree is one contiguous run: a lookup that descends reads neighbouring lines instead
    /// of lines scattered in insertion order (at 100k+ entries the walk is bound by cache
    /// misses). O(n); indices never leave the tree, so nothing else changes.
    fn relayout(&mut self) {
        self.churn = 0;
        let mut order: Vec<u32> = Vec::with_capacity(self.len);
        let mut stack: Vec<u32> = Vec::with_capacity(MAX_HEIGHT);
        if self.root != NIL {
            stack.push(self.root);
        }
        while let Some(i) = stack.pop() {
            order.push(i);
            let n = &self.nodes[i as usize];
            if n.right != NIL {
                stack.push(n.right);
            }
            if n.left != NIL {
                stack.push(n.left);
            }
        }
        let mut new_idx = vec![NIL; self.nodes.len()];
        for (k, &old) in order.iter().enumerate() {
            new_idx[old as usize] = k as u32;
        }
        let map = |i: u32| if i == NIL { NIL } else { new_idx[i as usize] };
        let mut old = std::mem::take(&mut self.nodes);
        self.nodes = order
            .iter()
            .map(|&i| {
                let n = &mut old[i as usize];
                Node {
                    key: n.key,
                    last: n.last,
                    max_last: n.max_last,
                    left: map(n.left),
                    right: map(n.right),
                    height: n.height,
                    value: n.value.take(),
                }
            })
            .collect();
        self.free.clear();
        self.root = if order.is_empty() { NIL } else { 0 };
    }

    /// Removes and returns the entry stored under `(range.start(), id)`, if present.
    pub(crate) fn remove(&mut self, range: Range, id: u64) -> Option<V> {
        let key = Key {
            start: range.start(),
            id,
        };
        let mut removed = NIL;
        self.root = self.remove_at(self.root, &key, &mut removed);
        if removed == NIL {
            return None;
        }
        self.len -= 1;
        let value = self.nodes[removed as usize].value.take();
        self.free.push(removed);
        self.changed();
        value
    }

    /// Removes every entry, returning their values in start order.
    pub(crate) fn drain(&mut self) -> Vec<V> {
        let mut out = Vec::with_capacity(self.len);
        let mut stack = Vec::new();
        let mut cur = self.root;
        while cur != NIL || !stack.is_empty() {
            while cur != NIL {
                stack.push(cur);
                cur = self.nodes[cur as usize].left;
            }
            let Some(idx) = stack.pop() else { break };
            if let Some(v) = self.nodes[idx as usize].value.take() {
                out.push(v);
            }
            cur = self.nodes[idx as usize].right;
        }
        *self = IntervalTree::new();
        out
    }

    /// Calls `f` for every entry overlapping `range`, in order of start address (then id),
    /// until `f` breaks. Allocates nothing.
    pub(crate) fn for_each_overlap<B>(
        &self,
        range: Range,
        mut f: impl FnMut(&V) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        let (qs, ql) = (range.start(), range.last());
        let mut stack = [NIL; MAX_HEIGHT];
        let mut depth = 0usize;
        let mut cur = self.root;
        loop {
            // Go left as long as the left subtree can still hold an overlapping entry.
            while cur != NIL {
                let n = &self.nodes[cur as usize];
                if n.max_last < qs {
                    // Nothing in this subtree reaches the query.
                    break;
                }
                stack[depth] = cur;
                depth += 1;
                cur = n.left;
            }
            if depth == 0 {
                return ControlFlow::Continue(());
            }
            depth -= 1;
            let n = &self.nodes[stack[depth] as usize];
            if n.key.start > ql {
                // This node and everything to its right start after the query ends; the
                // nodes still on the stack are ancestors with even larger starts.
                return ControlFlow::Continue(());
            }
            if n.last >= qs {
                if let Some(v) = &n.value {
                    f(v)?;
                }
            }
            cur = n.right;
        }
    }

    /// Calls `f` for every entry in start order.
    pub(crate) fn for_each(&self, mut f: impl FnMut(Range, &V)) {
        let mut stack = [NIL; MAX_HEIGHT];
        let mut depth = 0usize;
        let mut cur = self.root;
        loop {
            while cur != NIL {
                stack[depth] = cur;
                depth += 1;
                cur = self.nodes[cur as usize].left;
            }
            if depth == 0 {
                return;
            }
            depth -= 1;
            let n = &self.nodes[stack[depth] as usize];
            if let (Some(v), Ok(r)) = (&n.value, Range::inclusive(n.key.start, n.last)) {
                f(r, v);
            }
            cur = n.right;
        }
    }

    fn height(&self, idx: u32) -> u8 {
        if idx == NIL {
            0
        } else {
            self.nodes[idx as usize].height
        }
    }

    fn max_last(&self, idx: u32) -> Option<u64> {
        (idx != NIL).then(|| self.nodes[idx as usize].max_last)
    }

    /// Recomputes height and `max_last` of `idx` from its children.
    fn update(&mut self, idx: u32) {
        let (l, r) = {
            let n = &self.nodes[idx as usize];
            (n.left, n.right)
        };
        let height = 1 + self.height(l).max(self.height(r));
        let mut max_last = self.nodes[idx as usize].last;
        if let Some(m) = self.max_last(l) {
            max_last = max_last.max(m);
        }
        if let Some(m) = self.max_last(r) {
            max_last = max_last.max(m);
        }
        let n = &mut self.nodes[idx as usize];
        n.height = height;
        n.max_last = max_last;
    }

    fn rotate_right(&mut self, idx: u32) -> u32 {
        let l = self.nodes[idx as usize].left;
        self.nodes[idx as usize].left = self.nodes[l as usize].right;
        self.nodes[l as usize].right = idx;
        self.update(idx);
        self.update(l);
        l
    }

    fn rotate_left(&mut self, idx: u32) -> u32 {
        let r = self.nodes[idx as usize].right;
        self.nodes[idx as usize].right = self.nodes[r as usize].left;
        self.nodes[r as usize].left = idx;
        self.update(idx);
        self.update(r);
        r
    }

    fn balance_factor(&self, idx: u32) -> i32 {
        let n = &self.nodes[idx as usize];
        i32::from(self.height(n.left)) - i32::from(self.height(n.right))
    }

    /// Restores the AVL invariant at `idx` after one of its subtrees changed height by one.
    fn rebalance(&mut self, idx: u32) -> u32 {
        self.update(idx);
        let bf = self.balance_factor(idx);
        if bf > 1 {
            let l = self.nodes[idx as usize].left;
            if self.balance_factor(l) < 0 {
                let nl = self.rotate_left(l);
                self.nodes[idx as usize].left = nl;
            }
            return self.rotate_right(idx);
        }
        if bf < -1 {
            let r = self.nodes[idx as usize].right;
            if self.balance_factor(r) > 0 {
                let nr = self.rotate_right(r);
                self.nodes[idx as usize].right = nr;
            }
            return self.rotate_left(idx);
        }
        idx
    }

    fn insert_at(&mut self, at: u32, new: u32) -> u32 {
        if at == NIL {
            return new;
        }
        let go_left = self.nodes[new as usize]
            .key
            .cmp(&self.nodes[at as usize].key)
            == Ordering::Less;
        if go_left {
            let l = self.insert_at(self.nodes[at as usize].left, new);
            self.nodes[at as usize].left = l;
        } else {
            let r = self.insert_at(self.nodes[at as usize].right, new);
            self.nodes[at as usize].right = r;
        }
        self.rebalance(at)
    }

    /// Detaches the smallest node of the subtree at `at`; returns (new subtree root, min).
    fn take_min(&mut self, at: u32) -> (u32, u32) {
        let l = self.nodes[at as usize].left;
        if l == NIL {
            return (self.nodes[at as usize].right, at);
        }
        let (nl, min) = self.take_min(l);
        self.nodes[at as usize].left = nl;
        (self.rebalance(at), min)
    }

    fn remove_at(&mut self, at: u32, key: &Key, removed: &mut u32) -> u32 {
        if at == NIL {
            return NIL;
        }
        match key.cmp(&self.nodes[at as usize].key) {
            Ordering::Less => {
                let l = self.remove_at(self.nodes[at as usize].left, key, removed);
                self.nodes[at as usize].left = l;
            }
            Ordering::Greater => {
                let r = self.remove_at(self.nodes[at as usize].right, key, removed);
                self.nodes[at as usize].right = r;
            }
            Ordering::Equal => {
                *removed = at;
                let (l, r) = {
                    let n = &self.nodes[at as usize];
                    (n.left, n.right)
                };
                if l == NIL {
                    return r;
                }
                if r == NIL {
                    return l;
                }
                let (nr, succ) = self.take_min(r);
                self.nodes[succ as usize].left = l;
                self.nodes[succ as usize].right = nr;
                return self.rebalance(succ);
            }
        }
        self.rebalance(at)
    }

    /// Checks the AVL and augmentation invariants; returns the height. Tests only.
    #[cfg(test)]
    fn check(&self, at: u32, lo: Option<Key>, hi: Option<Key>) -> u8 {
        if at == NIL {
            return 0;
        }
        let n = &self.nodes[at as usize];
        if let Some(lo) = lo {
            assert_eq!(lo.cmp(&n.key), Ordering::Less, "order");
        }
        if let Some(hi) = hi {
            assert_eq!(n.key.cmp(&hi), Ordering::Less, "order");
        }
        let hl = self.check(n.left, lo, Some(n.key));
        let hr = self.check(n.right, Some(n.key), hi);
        assert!((i32::from(hl) - i32::from(hr)).abs() <= 1, "balance");
        assert_eq!(n.height, 1 + hl.max(hr), "height");
        let mut m = n.last;
        if let Some(x) = self.max_last(n.left) {
            m = m.max(x);
        }
        if let Some(x) = self.max_last(n.right) {
            m = m.max(x);
        }
        assert_eq!(n.max_last, m, "max_last");
        n.height
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(start: u64, len: u64) -> Range {
        Range::new(start, len).expect("test range")
    }

    fn hits(t: &IntervalTree<u64>, q: Range) -> Vec<u64> {
        let mut v = Vec::new();
        let _ = t.for_each_overlap::<()>(q, |&id| {
            v.push(id);
            ControlFlow::Continue(())
        });
        v
    }

    #[test]
    fn visits_overlaps_in_start_order_and_stops_early() {
        let mut t = IntervalTree::new();
        t.insert(r(0x3000, 0x1000), 3, 3u64);
        t.insert(r(0x1000, 0x1000), 1, 1);
        t.insert(r(0x2000, 0x3000), 2, 2);
        t.insert(r(0x1000, 0x1000), 4, 4);
        assert_eq!(hits(&t, r(0, u64::MAX)), vec![1, 4, 2, 3]);
        assert_eq!(hits(&t, r(0x2000, 1)), vec![2]);
        assert_eq!(hits(&t, r(0x1fff, 2)), vec![1, 4, 2]);
        assert_eq!(hits(&t, r(0x5000, 0x1000)), Vec::<u64>::new());
        let mut seen = 0;
        let flow = t.for_each_overlap(Range::FULL, |_| {
            seen += 1;
            if seen == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert!(flow.is_break());
        assert_eq!(seen, 2);
        assert_eq!(t.remove(r(0x1000, 0x1000), 4), Some(4));
        assert_eq!(t.remove(r(0x1000, 0x1000), 4), None);
        assert_eq!(t.len(), 3);
        assert_eq!(t.drain(), vec![1, 2, 3]);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn relayout_keeps_every_entry_and_lays_the_arena_out_in_preorder() {
        let mut t = IntervalTree::new();
        let mut model: Vec<(Range, u64)> = Vec::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for id in 0..3000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let range = r((x % 4096) * 0x1000, (x % 7 + 1) * 0x1000);
            t.insert(range, id, id);
            model.push((range, id));
            if id % 3 == 0 {
                let (gone, gid) = model.swap_remove((x % model.len() as u64) as usize);
                assert_eq!(t.remove(gone, gid), Some(gid));
            }
        }
        t.relayout();
        assert_eq!(t.nodes.len(), t.len(), "no holes after a relayout");
        assert_eq!(t.root, 0);
        // Preorder: every left child directly follows its parent.
        for (i, n) in t.nodes.iter().enumerate() {
            assert!(n.left == NIL || n.left as usize == i + 1);
        }
        for q in [r(0, 1 << 40), r(0x10_0000, 0x3000), r(0xfff_000, 0x1000)] {
            let mut want: Vec<(u64, u64)> = model
                .iter()
                .filter(|(m, _)| m.overlaps(&q))
                .map(|(m, id)| (m.start(), *id))
                .collect();
            want.sort_unstable();
            let got = hits(&t, q);
            assert_eq!(got, want.iter().map(|w| w.1).collect::<Vec<_>>());
        }
    }

    proptest! {
        #[test]
        fn matches_a_linear_scan(
            ops in prop::collection::vec((0u8..3, 0u64..64, 1u64..16), 1..300),
        ) {
            let mut t = IntervalTree::new();
            let mut model: Vec<(Range, u64)> = Vec::new();
            let mut next_id = 0u64;
            for (op, a, b) in ops {
                let range = r(a * 0x1000, b * 0x1000);
                match op {
                    0 => {
                        t.insert(range, next_id, next_id);
                        model.push((range, next_id));
                        next_id += 1;
                    }
                    1 if !model.is_empty() => {
                        let (range, id) = model.remove((a as usize) % model.len());
                        prop_assert_eq!(t.remove(range, id), Some(id));
                    }
                    _ => {
                        let mut want: Vec<(u64, u64)> = model
                            .iter()
                            .filter(|(mr, _)| mr.overlaps(&range))
                            .map(|(mr, id)| (mr.start(), *id))
                            .collect();
                        want.sort_unstable();
                        let want: Vec<u64> = want.into_iter().map(|(_, id)| id).collect();
                        prop_assert_eq!(hits(&t, range), want);
                    }
                }
                t.check(t.root, None, None);
                prop_assert_eq!(t.len(), model.len());
            }
        }
    }
}
