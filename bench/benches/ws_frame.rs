//! MQTT over WebSocket: unmasking (word-at-a-time vs the byte loop), the
//! frame decoder over buffers of client frames, and server frame headers.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use tarta_bench::read_buffer;
use tarta_bench::ws_frame::{self as ws, MASK, SIZES};
use tarta_proto::ws::mask::{unmask, unmask_bytewise};
use tarta_proto::ws::FrameDecoder;

// The allocator the broker binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn mask(c: &mut Criterion) {
    let mut g = c.benchmark_group("unmask");
    for len in SIZES {
        let mut buf = ws::data(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("word", len), &len, |b, _| {
            b.iter(|| unmask(black_box(&mut buf), MASK, 0))
        });
        g.bench_with_input(BenchmarkId::new("bytewise", len), &len, |b, _| {
            b.iter(|| unmask_bytewise(black_box(&mut buf), MASK, 0))
        });
    }
    g.finish();
}

fn decoder(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_decode");
    // (name, frames per buffer, payload bytes per frame)
    let cases = [
        ("32x64B", 32, 64),
        ("8x1KiB", 8, 1024),
        ("4x16KiB", 4, 16 * 1024),
        ("1x64KiB", 1, 64 * 1024),
    ];
    for (name, frames, len) in cases {
        let wire = ws::client_stream(frames, len);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &wire, |b, wire| {
            let mut dec = FrameDecoder::new(1 << 20);
            b.iter_batched_ref(
                || read_buffer(wire),
                |buf| ws::decode_all(&mut dec, buf),
                BatchSize::NumIterations(if wire.len() > 8192 { 32 } else { 256 }),
            )
        });
    }
    g.finish();
}

fn header(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_header");
    g.throughput(Throughput::Elements(1));
    for len in [16u64, 1024, 100_000] {
        let mut out = [0u8; 10];
        g.bench_with_input(BenchmarkId::from_parameter(len), &len, |b, len| {
            b.iter(|| ws::server_header(black_box(*len), &mut out))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    targets = mask, decoder, header
}
criterion_main!(benches);
