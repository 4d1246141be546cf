//! Statistics without I/O: per-stream delivery accounting ([`Tracker`]) and
//! latency histograms ([`Latency`]) that merge across threads and processes.
//!
//! Architecture invariant: nothing here touches a socket, a runtime or the
//! clock, so every figure loadgen reports can be checked by unit and
//! quickcheck tests (see the tests at the bottom).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Most gaps a [`Tracker`] remembers. Beyond that the oldest gap is given up
/// (its messages stay counted as lost; should one of them still arrive it is
/// counted as a duplicate and in `gaps_forgotten`).
pub const MAX_GAPS: usize = 4096;

/// Delivery accounting for one publisher -> subscriber stream whose messages
/// carry sequence numbers 0, 1, 2, ...
///
/// - `unique`: distinct sequence numbers received;
/// - `duplicated`: arrivals of a sequence number already received;
/// - `reordered`: first arrivals of a sequence number lower than one
///   already received (it filled a gap).
///
/// Loss is `sent - unique`, computed by whoever knows `sent` (the publisher
/// may live on another thread or process). Memory is one small struct per
/// stream plus one range per gap still open, so in-order delivery allocates
/// nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tracker {
    /// One more than the highest sequence number received (0: none yet).
    next: u64,
    /// Missing sequence numbers below `next`, as sorted disjoint `[a, b)`.
    gaps: Vec<(u64, u64)>,
    pub unique: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub gaps_forgotten: u64,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the arrival of sequence number `seq`.
    pub fn record(&mut self, seq: u64) {
        if seq == self.next {
            self.next += 1;
            self.unique += 1;
            return;
        }
        if seq > self.next {
            if self.gaps.len() == MAX_GAPS {
                self.gaps.remove(0);
                self.gaps_forgotten += 1;
            }
            self.gaps.push((self.next, seq));
            self.next = seq + 1;
            self.unique += 1;
            return;
        }
        // seq < next: a late first arrival (it lies in a gap) or a duplicate.
        let i = self.gaps.partition_point(|&(_, b)| b <= seq);
        match self.gaps.get(i).copied() {
            Some((a, b)) if a <= seq => {
                self.unique += 1;
                self.reordered += 1;
                match (a == seq, seq + 1 == b) {
                    (true, true) => {
                        self.gaps.remove(i);
                    }
                    (true, false) => self.gaps[i].0 = seq + 1,
                    (false, true) => self.gaps[i].1 = seq,
                    (false, false) => {
                        self.gaps[i].1 = seq;
                        self.gaps.insert(i + 1, (seq + 1, b));
                    }
                }
            }
            _ => self.duplicated += 1,
        }
    }

    /// Sequence numbers missing below the highest one received.
    #[cfg(test)]
    pub fn missing_inside(&self) -> u64 {
        self.gaps.iter().map(|(a, b)| b - a).sum()
    }

    /// One more than the highest sequence number received.
    #[cfg(test)]
    pub fn high(&self) -> u64 {
        self.next
    }

    /// Adds this stream's counts to a total.
    pub fn add_to(&self, t: &mut DeliveryTotals) {
        t.unique += self.unique;
        t.duplicated += self.duplicated;
        t.reordered += self.reordered;
        t.gaps_forgotten += self.gaps_forgotten;
    }
}

/// Sums of [`Tracker`] counts over many streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryTotals {
    pub unique: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub gaps_forgotten: u64,
}

impl DeliveryTotals {
    pub fn merge(&mut self, o: &DeliveryTotals) {
        self.unique += o.unique;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.gaps_forgotten += o.gaps_forgotten;
    }
}

/// Highest latency recorded exactly (µs); larger values are clamped to it.
const MAX_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds (HDR, 3 significant digits).
#[derive(Debug, Clone)]
pub struct Latency {
    h: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

/// Percentiles of a [`Latency`], in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn new() -> Self {
        // Bounds and precision are constants known to be valid.
        #[allow(clippy::expect_used)]
        let h = Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds");
        Latency { h }
    }

    /// Records one latency in microseconds (0 counts as 1, huge values clamp).
    pub fn record(&mut self, us: u64) {
        self.h.saturating_record(us.clamp(1, MAX_US));
    }

    pub fn record_n(&mut self, us: u64, n: u64) {
        // Cannot fail: the value is clamped into the histogram's range.
        let _ = self.h.record_n(us.clamp(1, MAX_US), n);
    }

    pub fn merge(&mut self, o: &Latency) {
        // Cannot fail: both histograms have the same bounds.
        let _ = self.h.add(&o.h);
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    pub fn reset(&mut self) {
        self.h.reset();
    }

    pub fn percentiles(&self) -> Percentiles {
        if self.h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: self.h.len(),
            min: self.h.min(),
            mean: self.h.mean(),
            p50: self.h.value_at_quantile(0.5),
            p90: self.h.value_at_quantile(0.9),
            p99: self.h.value_at_quantile(0.99),
            p999: self.h.value_at_quantile(0.999),
            max: self.h.max(),
        }
    }

    /// The recorded buckets as `(value, count)` pairs, to send across
    /// processes; [`Latency::from_buckets`] rebuilds an equivalent histogram.
    pub fn buckets(&self) -> Vec<(u64, u64)> {
        self.h
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    pub fn from_buckets(b: &[(u64, u64)]) -> Self {
        let mut l = Latency::new();
        for &(v, n) in b {
            l.record_n(v, n);
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{quickcheck, TestResult};
    use std::collections::HashSet;

    /// The obvious model: sets and a running maximum.
    fn model(seqs: &[u64]) -> (u64, u64, u64) {
        let mut seen = HashSet::new();
        let mut max: Option<u64> = None;
        let (mut unique, mut dup, mut reord) = (0, 0, 0);
        for &s in seqs {
            if seen.insert(s) {
                unique += 1;
                if max.is_some_and(|m| s < m) {
                    reord += 1;
                }
            } else {
                dup += 1;
            }
            max = Some(max.map_or(s, |m| m.max(s)));
        }
        (unique, dup, reord)
    }

    #[test]
    fn in_order_allocates_no_gaps() {
        let mut t = Tracker::new();
        for s in 0..1000 {
            t.record(s);
        }
        assert_eq!((t.unique, t.duplicated, t.reordered), (1000, 0, 0));
        assert_eq!(t.gaps.capacity(), 0);
    }

    #[test]
    fn gap_then_fill() {
        let mut t = Tracker::new();
        for s in [0, 1, 5, 3, 2, 4, 4, 9] {
            t.record(s);
        }
        assert_eq!(t.unique, 7);
        assert_eq!(t.duplicated, 1);
        assert_eq!(t.reordered, 3);
        assert_eq!(t.missing_inside(), 3); // 6, 7, 8
        assert_eq!(t.high(), 10);
    }

    quickcheck! {
        fn tracker_matches_model(seqs: Vec<u8>) -> bool {
            let seqs: Vec<u64> = seqs.into_iter().map(u64::from).collect();
            let mut t = Tracker::new();
            for &s in &seqs {
                t.record(s);
            }
            let (u, d, r) = model(&seqs);
            let distinct: HashSet<u64> = seqs.iter().copied().collect();
            let high = seqs.iter().max().map_or(0, |m| m + 1);
            (t.unique, t.duplicated, t.reordered) == (u, d, r)
                && t.high() == high
                && t.missing_inside() == high - distinct.len() as u64
        }

        /// A permutation of 0..n with some messages dropped and some
        /// repeated: loss = n - unique, duplicates exact.
        fn loss_on_lossy_permutation(n: u16, order: Vec<u16>, drop: Vec<u16>, dup: Vec<u16>) -> TestResult {
            let n = u64::from(n % 2000);
            if n == 0 {
                return TestResult::discard();
            }
            let mut seqs: Vec<u64> = (0..n).collect();
            // A deterministic shuffle driven by `order`.
            for (i, o) in order.iter().enumerate() {
                let a = i % seqs.len();
                let b = usize::from(*o) % seqs.len();
                seqs.swap(a, b);
            }
            let dropped: HashSet<u64> = drop.iter().map(|d| u64::from(*d) % n).collect();
            seqs.retain(|s| !dropped.contains(s));
            let mut dups = 0;
            for d in &dup {
                if !seqs.is_empty() {
                    let s = seqs[usize::from(*d) % seqs.len()];
                    seqs.push(s);
                    dups += 1;
                }
            }
            let mut t = Tracker::new();
            for &s in &seqs {
                t.record(s);
            }
            let (_, _, r) = model(&seqs);
            TestResult::from_bool(
                n - t.unique == dropped.len() as u64 && t.duplicated == dups && t.reordered == r,
            )
        }

        /// Recording in several histograms and merging them gives the same
        /// percentiles as recording everything in one (threads and
        /// processes merge this way, the latter through `buckets`).
        fn histogram_merge(parts: Vec<Vec<u32>>) -> bool {
            let mut all = Latency::new();
            let mut merged = Latency::new();
            let mut via_buckets = Latency::new();
            for part in &parts {
                let mut h = Latency::new();
                for &v in part {
                    h.record(u64::from(v));
                    all.record(u64::from(v));
                }
                merged.merge(&h);
                via_buckets.merge(&Latency::from_buckets(&h.buckets()));
            }
            all.percentiles() == merged.percentiles()
                && all.count() == via_buckets.count()
                && all.percentiles().p99 == via_buckets.percentiles().p99
                && all.percentiles().max == via_buckets.percentiles().max
        }

        fn totals_merge_is_sum(a: Vec<u8>, b: Vec<u8>) -> bool {
            let mut ta = Tracker::new();
            let mut tb = Tracker::new();
            a.iter().for_each(|s| ta.record(u64::from(*s)));
            b.iter().for_each(|s| tb.record(u64::from(*s)));
            let mut x = DeliveryTotals::default();
            ta.add_to(&mut x);
            let mut y = DeliveryTotals::default();
            tb.add_to(&mut y);
            x.merge(&y);
            x.unique == ta.unique + tb.unique && x.duplicated == ta.duplicated + tb.duplicated
        }
    }

    #[test]
    fn too_many_gaps_forgets_oldest() {
        let mut t = Tracker::new();
        for i in 0..(MAX_GAPS as u64 + 10) {
            t.record(i * 2 + 1);
        }
        assert_eq!(t.gaps.len(), MAX_GAPS);
        assert_eq!(t.gaps_forgotten, 10);
        // A forgotten one arriving late counts as a duplicate, not unique.
        t.record(0);
        assert_eq!(t.duplicated, 1);
    }

    #[test]
    fn percentiles_basic() {
        let mut h = Latency::new();
        for v in 1..=1000 {
            h.record(v);
        }
        let p = h.percentiles();
        assert_eq!(p.count, 1000);
        assert_eq!(p.p50, 500);
        assert!(p.p99 >= 990 && p.p99 <= 991);
        assert_eq!(p.max, 1000);
    }
}
