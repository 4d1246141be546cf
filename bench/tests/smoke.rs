//! Runs every suite's setup and work functions once on tiny inputs, so the
//! benchmarks cannot rot (`cargo test -p tarta-bench`).

use bytes::BytesMut;
use tarta_bench::{codec, hop, read_buffer, router, topic_index as ti, ws_frame as ws};
use tarta_proto::mqtt::{Packet, Protocol, QoS};
use tarta_proto::ws::mask::{unmask, unmask_bytewise};
use tarta_proto::ws::FrameDecoder;

#[test]
fn codec_packets_round_trip() {
    for protocol in [Protocol::V311, Protocol::V5] {
        let mut packets = vec![
            Packet::Connect(Box::new(codec::connect(protocol))),
            Packet::Subscribe(codec::subscribe(protocol, 1)),
            Packet::Subscribe(codec::subscribe(protocol, 100)),
        ];
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            packets.push(Packet::Publish(codec::publish(protocol, qos, 16)));
        }
        for p in packets {
            let wire = codec::wire(&p, protocol);
            let mut out = BytesMut::new();
            assert_eq!(codec::encode_into(&p, protocol, &mut out), wire.len());
            let mut buf = read_buffer(&wire);
            let decoded = codec::decode_one(&mut buf, protocol).unwrap().unwrap();
            assert_eq!(decoded, p, "{protocol:?}");
            assert!(buf.is_empty());
        }
        let p = codec::publish(protocol, QoS::AtLeastOnce, 4096);
        let mut out = BytesMut::new();
        let header = codec::encode_header_into(&p, protocol, &mut out);
        assert_eq!(
            header + 4096,
            codec::wire(&Packet::Publish(p), protocol).len()
        );
    }
    let mut stream = read_buffer(&codec::publish_stream(20));
    assert_eq!(codec::decode_all(&mut stream, Protocol::V311), 20);
    assert!(stream.is_empty());
}

#[test]
fn topic_index_agrees_with_the_naive_matcher() {
    let filters = ti::filters(1000);
    let mut index = ti::build(&filters);
    assert_eq!(index.len(), 1000);
    let topics = ti::topics(1000, 200);
    let mut total = 0;
    for t in &topics {
        let n = ti::count_matches(&index, t);
        assert_eq!(n, ti::naive_count(&filters, t), "{t}");
        total += n;
    }
    // The space is sized so that a topic matches a handful of filters.
    assert!(total > 200 * 2 && total < 200 * 60, "{total} matches");
    for (i, f) in ti::churn_filters(1000, 50).iter().enumerate() {
        ti::churn(&mut index, f, usize::MAX - i);
    }
    assert_eq!(index.len(), 1000);
}

#[test]
fn ws_frames_decode_and_unmask() {
    for len in [0, 1, 7, 8, 9, 100, 4096] {
        let (mut a, mut b) = (ws::data(len), ws::data(len));
        assert_eq!(
            unmask(&mut a, ws::MASK, 1),
            unmask_bytewise(&mut b, ws::MASK, 1)
        );
        assert_eq!(a, b);
    }
    for (frames, len) in [(3, 64), (2, 1024), (1, 70_000)] {
        let mut dec = FrameDecoder::new(1 << 20);
        let mut buf = read_buffer(&ws::client_stream(frames, len));
        assert_eq!(ws::decode_all(&mut dec, &mut buf), Ok(frames * len));
        assert!(buf.is_empty());
    }
    let mut out = [0u8; 10];
    assert_eq!(ws::server_header(16, &mut out), 2);
    assert_eq!(ws::server_header(1024, &mut out), 4);
    assert_eq!(ws::server_header(100_000, &mut out), 10);
}

#[test]
fn fanout_delivers_to_every_subscriber_without_copying_the_payload() {
    for (subs, len) in [(1, 64), (7, 16 * 1024)] {
        let f = router::Fanout::new(subs, len).unwrap();
        assert_eq!(f.queued(), 0);
        f.check_zero_copy().unwrap();
        f.publish().unwrap();
        assert!(f.queued() > subs * len, "every subscriber got the message");
        f.drain();
        assert_eq!(f.queued(), 0);
    }
}

#[test]
fn cross_shard_hop_delivers_every_message() {
    for retry in [hop::Retry::Sleep, hop::Retry::Spin] {
        let mut h = hop::Hop::start(4, retry).unwrap();
        h.run(10, 1).unwrap();
        h.run(50, 64).unwrap();
        assert_eq!(h.sent(), 10 + 50 * 64);
        h.stop().unwrap();
    }
}

#[test]
fn retained_tree_agrees_with_the_scan() {
    use tarta_bench::retained::{self as rt, Shape, FILTERS};
    for shape in [Shape::Wide, Shape::Narrow] {
        let mut tree = rt::build_tree(shape, 3000);
        let mut map = rt::build_map(shape, 3000);
        assert_eq!(tree.len(), 3000);
        let extra = [
            "sensors/+/+/temp",
            "sensors/2/#",
            "+/1/7/+",
            "sensors/1/7/temp",
        ];
        for filter in FILTERS.iter().map(|(_, f)| *f).chain(extra) {
            assert_eq!(
                rt::tree_count(&tree, filter),
                rt::scan_count(&map, filter),
                "{filter}"
            );
        }
        rt::tree_replace(&mut tree, &rt::topic(shape, 7));
        rt::map_replace(&mut map, &rt::topic(shape, 7));
        assert_eq!((tree.len(), map.len()), (3000, 3000));
    }
    let tree = rt::build_tree(Shape::Narrow, 3000);
    for (_, filter) in FILTERS {
        assert_eq!(rt::tree_count(&tree, filter), 10, "{filter}");
    }
}
