//! Routing through the real broker code.
//!
//! `fanout`: one QoS 0 PUBLISH handled by `client::on_packet` on a shard
//! with 1, 100 or 10,000 local subscribers (topic check, index match,
//! per-session merge, one header encode and one queue push per
//! subscriber). Throughput counts deliveries. Publishes are timed in chunks
//! of 16; the subscribers' write queues are drained, untimed, between
//! chunks (draining is the writer's work). The setup asserts that every
//! subscriber's queue references the publisher's payload buffer (no copy).
//!
//! `cross_shard_hop`: messages/s from a producer executor to a consumer
//! executor over the mesh (crossbeam channel + doorbell), batches of 1 and
//! 64, timed end to end (see `tarta_bench::hop`). `pump_retry`: on a full
//! channel the producer sleeps 200 µs like the mesh pump; `spin_retry`: it
//! retries at once, which shows the hop without the back-off.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::{Duration, Instant};
use tarta_bench::hop::{Hop, Retry, CAPACITY};
use tarta_bench::router::Fanout;

// The allocator the broker binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHUNK: u64 = 16;

fn fanout(c: &mut Criterion) {
    fanout_group(c, "fanout", &[1, 100, 10_000], &[64, 16 * 1024], CHUNK);
    // The same with the queues drained after every publish: each
    // subscriber's header buffer is then free to reuse, while with 16
    // publishes between drains each header allocates (see tests/allocs.rs).
    fanout_group(c, "fanout_drain_every_publish", &[100, 10_000], &[64], 1);
}

fn fanout_group(c: &mut Criterion, name: &str, subscribers: &[usize], lens: &[usize], chunk: u64) {
    let mut g = c.benchmark_group(name);
    for &subs in subscribers {
        for &len in lens {
            let f = match Fanout::new(subs, len) {
                Ok(f) => f,
                Err(e) => panic!("fan-out setup ({subs} subscribers, {len} B): {e}"),
            };
            if let Err(e) = f.check_zero_copy() {
                panic!("per-subscriber payload copy ({subs} subscribers, {len} B): {e}");
            }
            g.throughput(Throughput::Elements(subs as u64));
            if subs >= 10_000 {
                g.sample_size(15);
            } else {
                g.sample_size(30);
            }
            let id = BenchmarkId::new(format!("{subs}subs"), format!("{len}B"));
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let n = left.min(chunk);
                        let start = Instant::now();
                        for _ in 0..n {
                            if let Err(e) = f.publish() {
                                panic!("publish: {e}");
                            }
                        }
                        timed += start.elapsed();
                        f.drain();
                        left -= n;
                    }
                    timed
                })
            });
        }
    }
    g.finish();
}

fn hop(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_shard_hop");
    g.sample_size(20);
    for (name, retry) in [("pump_retry", Retry::Sleep), ("spin_retry", Retry::Spin)] {
        let mut hop = match Hop::start(CAPACITY, retry) {
            Ok(h) => h,
            Err(e) => panic!("cannot start the executors: {e}"),
        };
        for batch in [1usize, 64] {
            let (full0, sent0) = (hop.full_count(), hop.sent());
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_function(BenchmarkId::new(name, format!("batch{batch}")), |b| {
                b.iter_custom(|batches| match hop.run(batches, batch) {
                    Ok(d) => d,
                    Err(e) => panic!("hop: {e}"),
                })
            });
            eprintln!(
                "cross_shard_hop {name} batch={batch}: channel full {} times in {} batches",
                hop.full_count() - full0,
                (hop.sent() - sent0) / batch as u64
            );
        }
        if let Err(e) = hop.stop() {
            panic!("stopping the executors: {e}");
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = fanout, hop
}
criterion_main!(benches);
