//! Topic index: matches per second against 1k, 100k and 1M filters of
//! realistic shape (see `tarta_bench::topic_index`), subscribe/unsubscribe
//! churn, and a naive matcher (`topic::matches` over every filter) as the
//! baseline at 1k and 100k. At 1M the naive matcher would spend ~10 ms per
//! topic, so it is not run there.
//!
//! Each iteration matches one topic; the topics cycle through 1024 drawn
//! from the filters' space. The 1M index is built once per process.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tarta_bench::topic_index as ti;

// The allocator the broker binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOPICS: usize = 1024;

fn label(n: usize) -> String {
    match n {
        1_000_000 => "1M".into(),
        n if n >= 1000 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

fn index(c: &mut Criterion) {
    for n in [1_000, 100_000, 1_000_000] {
        let filters = ti::filters(n);
        let rss0 = ti::rss_bytes().unwrap_or(0);
        let t = Instant::now();
        let mut index = ti::build(&filters);
        let built = t.elapsed();
        let rss = ti::rss_bytes().unwrap_or(0).saturating_sub(rss0);
        let topics = ti::topics(n, TOPICS);
        let matched: usize = topics.iter().map(|t| ti::count_matches(&index, t)).sum();
        eprintln!(
            "topic_index: {} filters: built in {:.2?}, {} nodes, ~{} MiB RSS, {:.1} matches/topic",
            label(n),
            built,
            index.node_count(),
            rss >> 20,
            matched as f64 / TOPICS as f64
        );
        if n <= 100_000 {
            // The trie and the baseline must agree before they are compared.
            for t in topics.iter().take(64) {
                assert_eq!(
                    ti::count_matches(&index, t),
                    ti::naive_count(&filters, t),
                    "topic {t}"
                );
            }
        }

        let mut g = c.benchmark_group("topic_match");
        g.throughput(Throughput::Elements(1));
        if n >= 100_000 {
            g.sample_size(20);
        }
        g.bench_function(BenchmarkId::new("index", label(n)), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % TOPICS;
                ti::count_matches(&index, black_box(&topics[i]))
            })
        });
        if n <= 100_000 {
            g.bench_function(BenchmarkId::new("naive", label(n)), |b| {
                let mut i = 0;
                b.iter(|| {
                    i = (i + 1) % TOPICS;
                    ti::naive_count(&filters, black_box(&topics[i]))
                })
            });
        }
        g.finish();

        let churn = ti::churn_filters(n, TOPICS);
        let mut g = c.benchmark_group("topic_churn");
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("sub+unsub", label(n)), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % TOPICS;
                ti::churn(&mut index, black_box(&churn[i]), usize::MAX - i)
            })
        });
        g.finish();
        assert_eq!(index.len(), n, "churn must leave the index as it was");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = index
}
criterion_main!(benches);
