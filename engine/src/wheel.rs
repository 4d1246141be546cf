//! A hashed timer wheel with one-second slots, for keep-alive and CONNECT
//! timeouts: O(1) per connection per period, instead of one timer task each.
//!
//! Entries are checked lazily: a connection updates only its own "last
//! heard" second on activity; when its slot comes due, the shard asks it for
//! its real deadline and re-inserts it if that moved. No clock is read here:
//! the caller passes the current second.

/// Number of one-second slots; deadlines further out wrap and are re-checked.
const SLOTS: usize = 1024;

pub struct Wheel<T> {
    slots: Vec<Vec<T>>,
    /// The next second to expire.
    cursor: u64,
    len: usize,
    /// The next slot `sweep` looks at.
    sweep_at: usize,
}

impl<T> Wheel<T> {
    pub fn new(now: u64) -> Self {
        Wheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            cursor: now,
            len: 0,
            sweep_at: 0,
        }
    }

    /// Looks at the next `n` slots (round robin) and drops the items `keep`
    /// rejects: entries whose connection is gone, which would otherwise
    /// wait for their slot to come due. Sweeping 64 slots a second visits
    /// the whole wheel every 16 seconds.
    pub fn sweep(&mut self, n: usize, mut keep: impl FnMut(&T) -> bool) {
        for _ in 0..n.min(SLOTS) {
            let slot = &mut self.slots[self.sweep_at];
            let before = slot.len();
            slot.retain(&mut keep);
            if slot.is_empty() && slot.capacity() > 64 {
                // A burst of connections came due together: give it back.
                *slot = Vec::new();
            }
            self.len -= before - slot.len();
            self.sweep_at = (self.sweep_at + 1) % SLOTS;
        }
    }

    /// Schedules `item` to be looked at at second `at` (or at the next tick if
    /// `at` is already past).
    pub fn insert(&mut self, at: u64, item: T) {
        let at = at.max(self.cursor);
        self.slots[(at % SLOTS as u64) as usize].push(item);
        self.len += 1;
    }

    /// Moves every item whose slot is due at or before `now` into `due`.
    /// Items in a due slot may belong to a later lap of the wheel: the
    /// caller checks the real deadline and re-inserts them.
    pub fn expire(&mut self, now: u64, due: &mut Vec<T>) {
        let laps = now.saturating_sub(self.cursor).min(SLOTS as u64 - 1);
        for s in self.cursor..=self.cursor + laps {
            let slot = &mut self.slots[(s % SLOTS as u64) as usize];
            self.len -= slot.len();
            due.append(slot);
        }
        self.cursor = now + 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_come_due_at_their_second_not_before() {
        let mut w = Wheel::new(100);
        w.insert(103, "a");
        w.insert(101, "b");
        w.insert(50, "past");
        let mut due = Vec::new();
        w.expire(100, &mut due);
        assert_eq!(due, vec!["past"]);
        due.clear();
        w.expire(102, &mut due);
        assert_eq!(due, vec!["b"]);
        due.clear();
        w.expire(103, &mut due);
        assert_eq!(due, vec!["a"]);
        assert!(w.is_empty());
    }

    #[test]
    fn far_deadlines_wrap_and_are_reported_early_for_recheck() {
        let mut w = Wheel::new(0);
        w.insert(SLOTS as u64 + 5, 1u32);
        let mut due = Vec::new();
        w.expire(5, &mut due);
        assert_eq!(
            due,
            vec![1],
            "same slot on an earlier lap: caller re-checks"
        );
    }

    #[test]
    fn sweep_drops_rejected_items_across_the_whole_wheel() {
        let mut w = Wheel::new(0);
        for i in 0..5000u64 {
            w.insert(i % 900 + 1, i);
        }
        // Every 64 slots per call: 16 calls cover the wheel.
        for _ in 0..16 {
            w.sweep(64, |i| i % 2 == 0);
        }
        assert_eq!(w.len(), 2500);
        let mut due = Vec::new();
        w.expire(2000, &mut due);
        assert_eq!(due.len(), 2500);
        assert!(due.iter().all(|i| i % 2 == 0));
    }

    #[test]
    fn a_long_pause_expires_everything_once() {
        let mut w = Wheel::new(0);
        for i in 0..3000u64 {
            w.insert(i, i);
        }
        let mut due = Vec::new();
        w.expire(5000, &mut due);
        assert_eq!(due.len(), 3000);
        assert!(w.is_empty());
    }
}
