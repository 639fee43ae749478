//! At-most-once apply: a bounded window of recently applied dedup ids per partition.
//!
//! The window holds the last `capacity` ids in log order (FIFO). An event whose id is in the
//! window is skipped. Because the window is rebuilt deterministically from the log and saved in
//! snapshots, a replay after a crash skips exactly what the live run skipped. Beyond the window
//! a duplicate is applied again — harmless for latest values (same event, same time), and the
//! window is sized (`store.dedup_window_events`) to cover any realistic retry horizon.

use std::collections::{HashSet, VecDeque};

#[derive(Debug, Clone)]
pub struct DedupWindow {
    capacity: usize,
    order: VecDeque<u128>,
    seen: HashSet<u128>,
}

impl DedupWindow {
    pub fn new(capacity: usize) -> DedupWindow {
        DedupWindow {
            capacity,
            order: VecDeque::new(),
            seen: HashSet::new(),
        }
    }

    /// Records `id`; returns false if it was already in the window (a duplicate).
    pub fn insert(&mut self, id: u128) -> bool {
        if self.capacity == 0 {
            return true;
        }
        if !self.seen.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity {
            let evicted = self
                .order
                .pop_front()
                .expect("over capacity means non-empty");
            self.seen.remove(&evicted);
        }
        debug_assert_eq!(self.order.len(), self.seen.len());
        true
    }

    /// Makes room for `ids` more ids (at most the window's capacity): a snapshot's window
    /// about to load.
    pub fn reserve(&mut self, ids: usize) {
        let ids = ids.min(self.capacity.saturating_sub(self.order.len()));
        self.order.reserve(ids);
        self.seen.reserve(ids);
    }

    /// Ids oldest first, for snapshots.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u128> + '_ {
        self.order.iter().copied()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_bounded_and_fifo() {
        let mut w = DedupWindow::new(2);
        assert!(w.insert(1));
        assert!(!w.insert(1));
        assert!(w.insert(2));
        assert!(w.insert(3));
        assert_eq!(w.len(), 2);
        assert!(w.insert(1), "1 fell out of the window");
        assert!(!w.insert(3));
    }

    #[test]
    fn reserving_is_bounded_by_the_window() {
        // A snapshot may claim any number of ids: reserving must not try to allocate them.
        let mut w = DedupWindow::new(4);
        w.reserve(usize::MAX);
        assert!(w.insert(1));
        assert!(!w.insert(1));
        let mut off = DedupWindow::new(0);
        off.reserve(usize::MAX);
        assert!(off.is_empty());
    }
}
