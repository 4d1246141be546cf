//! Heap allocations per operation on the hot paths, counted with a wrapping
//! global allocator (steady state: each operation runs once before it is
//! counted). Asserts the documented invariants (decoding a 3.1.1 QoS 0
//! PUBLISH and matching a topic allocate nothing) and prints the rest:
//! `cargo test -p tarta-bench --test allocs -- --nocapture`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use tarta_bench::{codec, read_buffer, router, topic_index as ti, ws_frame as ws};
use tarta_proto::mqtt::{Packet, Protocol, QoS};
use tarta_proto::ws::FrameDecoder;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations (and reallocations) on this thread while `f` runs.
fn count<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ALLOCS.with(Cell::get);
    let out = f();
    (ALLOCS.with(Cell::get) - before, out)
}

/// Allocations per run of `work` on a fresh input from `setup`, after one
/// warm-up run.
fn per_op<I, T>(mut setup: impl FnMut() -> I, mut work: impl FnMut(&mut I) -> T) -> u64 {
    let mut warm = setup();
    drop(work(&mut warm));
    let mut input = setup();
    let (n, out) = count(|| work(&mut input));
    drop(out);
    n
}

#[test]
fn allocations_per_operation() {
    let mut report = Vec::new();

    for (protocol, qos) in [
        (Protocol::V311, QoS::AtMostOnce),
        (Protocol::V311, QoS::AtLeastOnce),
        (Protocol::V5, QoS::AtLeastOnce),
    ] {
        let wire = codec::wire(
            &Packet::Publish(codec::publish(protocol, qos, 256)),
            protocol,
        );
        let n = per_op(|| read_buffer(&wire), |b| codec::decode_one(b, protocol));
        report.push((format!("decode PUBLISH {protocol:?} {qos:?} 256 B"), n));
        if protocol == Protocol::V311 && qos == QoS::AtMostOnce {
            assert_eq!(n, 0, "decoding a 3.1.1 QoS 0 PUBLISH allocates nothing");
        }
    }
    for protocol in [Protocol::V311, Protocol::V5] {
        let p = codec::publish(protocol, QoS::AtLeastOnce, 256);
        let mut out = bytes::BytesMut::with_capacity(256);
        let n = per_op(|| (), |_| codec::encode_header_into(&p, protocol, &mut out));
        report.push((
            format!("encode_publish_header {protocol:?} (reused buffer)"),
            n,
        ));
        let packet = Packet::Subscribe(codec::subscribe(protocol, 100));
        let wire = codec::wire(&packet, protocol);
        let n = per_op(|| read_buffer(&wire), |b| codec::decode_one(b, protocol));
        report.push((format!("decode SUBSCRIBE {protocol:?} 100 filters"), n));
    }

    let filters = ti::filters(1000);
    let mut index = ti::build(&filters);
    let topics = ti::topics(1000, 16);
    for t in &topics {
        let n = per_op(|| (), |_| ti::count_matches(&index, t));
        assert_eq!(n, 0, "matching {t} allocates nothing");
    }
    report.push(("topic index match (1k filters)".into(), 0));
    let churn = ti::churn_filters(1000, 16);
    let total: u64 = churn
        .iter()
        .enumerate()
        .map(|(i, f)| per_op(|| (), |_| ti::churn(&mut index, f, usize::MAX - i)))
        .sum();
    report.push((
        format!(
            "topic index sub+unsub (1k filters, mean of {})",
            churn.len()
        ),
        total / churn.len() as u64,
    ));

    let wire = ws::client_stream(32, 64);
    let mut dec = FrameDecoder::new(1 << 20);
    let n = per_op(|| read_buffer(&wire), |b| ws::decode_all(&mut dec, b));
    report.push(("ws FrameDecoder, 32 frames of 64 B".into(), n));

    for subs in [1, 100] {
        let f = router::Fanout::new(subs, 64).unwrap();
        f.publish().unwrap();
        f.drain();
        let (n, r) = count(|| f.publish());
        r.unwrap();
        let (d, ()) = count(|| f.drain());
        report.push((format!("fan-out publish to {subs} subscriber(s)"), n));
        report.push((format!("  drain of {subs} subscriber queue(s)"), d));
        // As in the benchmark: 16 publishes between drains, so queued
        // headers keep the write buffers shared.
        let (n, r) = count(|| (0..16).try_for_each(|_| f.publish()));
        r.unwrap();
        f.drain();
        report.push((
            format!("fan-out 16 publishes to {subs} subscriber(s), no drain in between"),
            n,
        ));
    }

    println!("allocations per operation:");
    for (what, n) in &report {
        println!("  {n:>6}  {what}");
    }
}
