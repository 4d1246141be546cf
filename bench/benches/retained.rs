//! Retained messages: answering a SUBSCRIBE's filter from 1,000,000 retained
//! topics with the trie (`RetainTree::for_each_match`) and with the old scan
//! (`topic::matches` on every key of a `HashMap`), for filters matching 10
//! topics (see `tarta_bench::retained`); and replacing one retained message.
//!
//! Before the timings it prints the heap each index holds per topic, counted
//! by the allocator below: bytes requested, and bytes of mimalloc's size
//! classes (`mi_usable_size`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tarta_bench::retained::{self as rt, Shape, FILTERS};

const N: usize = 1_000_000;

/// mimalloc (the broker's allocator), counting the live heap.
struct Counting;

extern "C" {
    /// In the mimalloc library `mimalloc` links; its binding needs the
    /// crate's `extended` feature, which needs one more crate.
    fn mi_usable_size(p: *const std::ffi::c_void) -> usize;
}

/// # Safety
/// `p` is a live mimalloc allocation.
unsafe fn usable_size(p: *const u8) -> usize {
    // SAFETY: our contract.
    unsafe { mi_usable_size(p.cast()) }
}

static REQUESTED: AtomicUsize = AtomicUsize::new(0);
static USABLE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to mimalloc unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            REQUESTED.fetch_add(layout.size(), Relaxed);
            // SAFETY: `p` was just allocated by mimalloc.
            USABLE.fetch_add(unsafe { usable_size(p) }, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        REQUESTED.fetch_sub(layout.size(), Relaxed);
        // SAFETY: `ptr` is a live mimalloc allocation (our contract).
        USABLE.fetch_sub(unsafe { usable_size(ptr) }, Relaxed);
        // SAFETY: same contract as ours.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` is a live mimalloc allocation (our contract).
        let old = unsafe { usable_size(ptr) };
        // SAFETY: same contract as ours.
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            REQUESTED.fetch_add(new_size, Relaxed);
            REQUESTED.fetch_sub(layout.size(), Relaxed);
            // SAFETY: `p` was just allocated by mimalloc.
            USABLE.fetch_add(unsafe { usable_size(p) }, Relaxed);
            USABLE.fetch_sub(old, Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Live heap bytes (requested, usable) that `build`'s result holds.
fn heap<T>(build: impl FnOnce() -> T) -> (T, f64, f64, Duration) {
    let (r0, u0) = (REQUESTED.load(Relaxed), USABLE.load(Relaxed));
    let t = Instant::now();
    let out = build();
    let took = t.elapsed();
    let r = REQUESTED.load(Relaxed).wrapping_sub(r0) as f64 / N as f64;
    let u = USABLE.load(Relaxed).wrapping_sub(u0) as f64 / N as f64;
    (out, r, u, took)
}

fn memory() {
    for shape in [Shape::Wide, Shape::Narrow] {
        let (tree, tr, tu, tt) = heap(|| rt::build_tree(shape, N));
        assert_eq!(tree.len(), N);
        drop(tree);
        let (map, mr, mu, mt) = heap(|| rt::build_map(shape, N));
        assert_eq!(map.len(), N);
        drop(map);
        eprintln!(
            "retained: 1M {}: RetainTree {tr:.1} B/topic requested, {tu:.1} B usable, built in \
             {tt:.2?}; HashMap<Box<str>, _> {mr:.1} B / {mu:.1} B, built in {mt:.2?}",
            shape.name()
        );
    }
}

fn retained(c: &mut Criterion) {
    memory();
    let mut tree = rt::build_tree(Shape::Narrow, N);
    let mut map = rt::build_map(Shape::Narrow, N);
    for (_, filter) in FILTERS {
        assert_eq!(rt::tree_count(&tree, filter), 10, "{filter}");
        assert_eq!(rt::scan_count(&map, filter), 10, "{filter}");
    }

    let mut g = c.benchmark_group("retained_match_1M");
    for (name, filter) in FILTERS {
        g.bench_function(BenchmarkId::new("tree", name), |b| {
            b.iter(|| rt::tree_count(&tree, black_box(filter)))
        });
    }
    g.sample_size(10);
    for (name, filter) in FILTERS {
        g.bench_function(BenchmarkId::new("scan", name), |b| {
            b.iter(|| rt::scan_count(&map, black_box(filter)))
        });
    }
    g.finish();

    let topics: Vec<String> = (0..1024)
        .map(|i| rt::topic(Shape::Narrow, i * 977))
        .collect();
    let mut g = c.benchmark_group("retained_replace_1M");
    g.bench_function("tree", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % topics.len();
            rt::tree_replace(&mut tree, black_box(&topics[i]))
        })
    });
    g.bench_function("map", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % topics.len();
            rt::map_replace(&mut map, black_box(&topics[i]))
        })
    });
    g.finish();
    assert_eq!((tree.len(), map.len()), (N, N));
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = retained
}
criterion_main!(benches);
