//! MQTT codec: decode and encode per packet type.
//!
//! Decode inputs are prepared outside the timed region (`iter_batched_ref`)
//! in a buffer whose storage is already shared, as the runtime's read
//! buffer is; decoding is zero-copy, so its cost does not grow with the
//! payload. Encode reuses one output buffer and copies the payload;
//! `encode_publish_header` is what the broker runs per delivery.

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use tarta_bench::codec::{self, PAYLOAD_SIZES};
use tarta_bench::read_buffer;
use tarta_proto::mqtt::{Packet, Protocol, QoS};

// The allocator the broker binary runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PROTOCOLS: [Protocol; 2] = [Protocol::V311, Protocol::V5];
const QOS: [QoS; 3] = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce];

/// Inputs per timed batch: enough to hide the timer, few enough that 64 KiB
/// packets stay within a few MiB.
fn batch(len: usize) -> BatchSize {
    BatchSize::NumIterations(if len > 8192 { 64 } else { 512 })
}

fn bench_decode(c: &mut Criterion, group: &str, cases: Vec<(String, Vec<u8>, Protocol)>) {
    let mut g = c.benchmark_group(group);
    for (id, wire, protocol) in cases {
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(id), &wire, |b, wire| {
            b.iter_batched_ref(
                || read_buffer(wire),
                |buf| codec::decode_one(buf, protocol),
                batch(wire.len()),
            )
        });
    }
    g.finish();
}

fn bench_encode(c: &mut Criterion, group: &str, cases: Vec<(String, Packet, Protocol)>) {
    let mut g = c.benchmark_group(group);
    for (id, packet, protocol) in cases {
        let len = codec::wire(&packet, protocol).len();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(id), &packet, |b, packet| {
            let mut out = bytes::BytesMut::with_capacity(len);
            b.iter(|| codec::encode_into(black_box(packet), protocol, &mut out))
        });
    }
    g.finish();
}

fn publish_cases() -> Vec<(String, Packet, Protocol)> {
    let mut cases = Vec::new();
    for protocol in PROTOCOLS {
        for qos in QOS {
            for len in PAYLOAD_SIZES {
                let id = format!(
                    "{}/qos{}/{}B",
                    codec::protocol_name(protocol),
                    qos as u8,
                    len
                );
                let p = Packet::Publish(codec::publish(protocol, qos, len));
                cases.push((id, p, protocol));
            }
        }
    }
    cases
}

fn wires(cases: &[(String, Packet, Protocol)]) -> Vec<(String, Vec<u8>, Protocol)> {
    cases
        .iter()
        .map(|(id, p, protocol)| (id.clone(), codec::wire(p, *protocol), *protocol))
        .collect()
}

fn control_cases() -> Vec<(String, Packet, Protocol)> {
    let mut cases = Vec::new();
    for protocol in PROTOCOLS {
        let name = codec::protocol_name(protocol);
        let connect = Packet::Connect(Box::new(codec::connect(protocol)));
        let what = if protocol.is_v5() {
            "connect/v5+will+props"
        } else {
            "connect/v3.1.1"
        };
        cases.push((what.to_string(), connect, protocol));
        for n in [1, 100] {
            let s = Packet::Subscribe(codec::subscribe(protocol, n));
            cases.push((format!("subscribe/{name}/{n}filters"), s, protocol));
        }
    }
    cases
}

fn publish(c: &mut Criterion) {
    let cases = publish_cases();
    bench_decode(c, "decode_publish", wires(&cases));
    bench_encode(c, "encode_publish", cases);

    let mut g = c.benchmark_group("encode_publish_header");
    for protocol in PROTOCOLS {
        for len in PAYLOAD_SIZES {
            let p = codec::publish(protocol, QoS::AtLeastOnce, len);
            let id = format!("{}/qos1/{}B", codec::protocol_name(protocol), len);
            let mut out = bytes::BytesMut::with_capacity(64);
            let header = codec::encode_header_into(&p, protocol, &mut out);
            g.throughput(Throughput::Bytes(header as u64));
            g.bench_function(id, |b| {
                b.iter(|| codec::encode_header_into(black_box(&p), protocol, &mut out))
            });
        }
    }
    g.finish();
}

fn control(c: &mut Criterion) {
    let cases = control_cases();
    bench_decode(c, "decode_control", wires(&cases));
    bench_encode(c, "encode_control", cases);
}

fn stream(c: &mut Criterion) {
    const N: usize = 1000;
    let wire = codec::publish_stream(N);
    let mut g = c.benchmark_group("decode_stream");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("1000x_publish_v3.1.1_qos0_16B", |b| {
        b.iter_batched_ref(
            || read_buffer(&wire),
            |buf| codec::decode_all(buf, Protocol::V311),
            BatchSize::NumIterations(8),
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    targets = publish, control, stream
}
criterion_main!(benches);
