//! Publish/subscribe across shards at every QoS, retained messages,
//! overlapping subscriptions, `$` topics.

use crate::harness::{id_on, rq, Broker};
use rumqttc::{QoS, SubscribeReasonCode};
use std::time::Duration;

const T: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(500);

async fn pair(b: &Broker, tag: &str) -> (rq::Client, rq::Client) {
    let sub = rq::connect(rq::opts(b.port, &id_on(1, &format!("{tag}-sub")))).await;
    let publ = rq::connect(rq::opts(b.port, &id_on(0, &format!("{tag}-pub")))).await;
    (sub, publ)
}

#[tokio::test]
async fn every_qos_crosses_shards_in_order() {
    let b = Broker::start();
    for (qos, tag) in [
        (QoS::AtMostOnce, "q0"),
        (QoS::AtLeastOnce, "q1"),
        (QoS::ExactlyOnce, "q2"),
    ] {
        let (mut sub, publ) = pair(&b, tag).await;
        let codes = sub.subscribe(&format!("{tag}/+/temp"), qos).await;
        assert_eq!(codes, vec![SubscribeReasonCode::Success(qos)]);
        for i in 0..50 {
            publ.client
                .publish(format!("{tag}/dev{i}/temp"), qos, false, format!("m{i}"))
                .await
                .unwrap();
        }
        let got = sub.drain_publishes(QUIET * 2).await;
        let payloads: Vec<String> = got
            .iter()
            .map(|p| String::from_utf8_lossy(&p.payload).into())
            .collect();
        let want: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
        assert_eq!(payloads, want, "{tag}: all messages, once, in order");
        assert!(got.iter().all(|p| p.qos == qos && !p.retain));
        sub.disconnect().await;
        publ.disconnect().await;
    }
}

#[tokio::test]
async fn delivered_qos_is_min_of_published_and_granted() {
    let b = Broker::start();
    let (mut sub, publ) = pair(&b, "minq").await;
    sub.subscribe("minq/a", QoS::AtLeastOnce).await;
    publ.client
        .publish("minq/a", QoS::ExactlyOnce, false, "x")
        .await
        .unwrap();
    publ.client
        .publish("minq/a", QoS::AtMostOnce, false, "y")
        .await
        .unwrap();
    let got = sub.drain_publishes(QUIET).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert_eq!(got[1].qos, QoS::AtMostOnce);
}

#[tokio::test]
async fn retained_stored_delivered_on_subscribe_and_cleared() {
    let b = Broker::start();
    let publ = rq::connect(rq::opts(b.port, &id_on(0, "ret-pub"))).await;
    publ.client
        .publish("ret/a", QoS::AtLeastOnce, true, "kept-a")
        .await
        .unwrap();
    publ.client
        .publish("ret/b", QoS::AtLeastOnce, true, "kept-b")
        .await
        .unwrap();
    publ.client
        .publish("ret/b", QoS::AtLeastOnce, true, "kept-b2")
        .await
        .unwrap();
    tokio::time::sleep(QUIET).await;

    // A late subscriber on the other shard gets both, with retain=1.
    let mut sub = rq::connect(rq::opts(b.port, &id_on(1, "ret-sub"))).await;
    sub.subscribe("ret/#", QoS::AtLeastOnce).await;
    let mut got: Vec<(String, bool)> = sub
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| (String::from_utf8_lossy(&p.payload).into_owned(), p.retain))
        .collect();
    got.sort();
    assert_eq!(got, vec![("kept-a".into(), true), ("kept-b2".into(), true)]);

    // A live message to an existing subscription has retain=0 (MQTT-3.3.1-9).
    publ.client
        .publish("ret/a", QoS::AtLeastOnce, true, "live")
        .await
        .unwrap();
    let p = sub.next_publish(T).await.unwrap();
    assert_eq!((&p.payload[..], p.retain), (&b"live"[..], false));

    // An empty retained payload clears it (MQTT-3.3.1-10).
    publ.client
        .publish("ret/a", QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    tokio::time::sleep(QUIET).await;
    let mut late = rq::connect(rq::opts(b.port, &id_on(0, "ret-late"))).await;
    late.subscribe("ret/#", QoS::AtMostOnce).await;
    let got: Vec<_> = late
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| p.payload)
        .collect();
    assert_eq!(got, vec![bytes::Bytes::from_static(b"kept-b2")]);
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_highest_qos() {
    let b = Broker::start();
    let (mut sub, publ) = pair(&b, "ovl").await;
    sub.subscribe("ovl/+", QoS::AtMostOnce).await;
    sub.subscribe("ovl/#", QoS::ExactlyOnce).await;
    sub.subscribe("ovl/x", QoS::AtLeastOnce).await;
    publ.client
        .publish("ovl/x", QoS::ExactlyOnce, false, "one")
        .await
        .unwrap();
    let got = sub.drain_publishes(QUIET).await;
    assert_eq!(
        got.len(),
        1,
        "one delivery for three matching subscriptions"
    );
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
}

#[tokio::test]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let b = Broker::start();
    let (mut sub, publ) = pair(&b, "dollar").await;
    sub.subscribe("#", QoS::AtMostOnce).await;
    sub.subscribe("+/app/x", QoS::AtMostOnce).await;
    let mut sys = rq::connect(rq::opts(b.port, &id_on(1, "dollar-sys"))).await;
    sys.subscribe("$app/#", QoS::AtMostOnce).await;
    publ.client
        .publish("$app/app/x", QoS::AtMostOnce, false, "hidden")
        .await
        .unwrap();
    publ.client
        .publish("plain/app/x", QoS::AtMostOnce, false, "seen")
        .await
        .unwrap();
    let got: Vec<_> = sub
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .filter(|p| !p.topic.starts_with("$SYS"))
        .map(|p| p.topic)
        .collect();
    assert_eq!(got, vec!["plain/app/x".to_string()], "MQTT-4.7.2-1");
    let got: Vec<_> = sys
        .drain_publishes(QUIET)
        .await
        .into_iter()
        .map(|p| p.topic)
        .collect();
    assert_eq!(got, vec!["$app/app/x".to_string()]);
}

#[tokio::test]
async fn unsubscribe_stops_delivery_across_shards() {
    let b = Broker::start();
    let (mut sub, mut publ) = pair(&b, "unsub").await;
    sub.subscribe("unsub/t", QoS::AtLeastOnce).await;
    publ.client
        .publish("unsub/t", QoS::AtLeastOnce, false, "before")
        .await
        .unwrap();
    publ.wait_ack().await;
    assert!(sub.next_publish(T).await.is_some());
    sub.client.unsubscribe("unsub/t").await.unwrap();
    loop {
        match sub.next_event(T).await {
            Some(rumqttc::Event::Incoming(rumqttc::Packet::UnsubAck(_))) => break,
            Some(_) => {}
            None => panic!("no UNSUBACK"),
        }
    }
    publ.client
        .publish("unsub/t", QoS::AtLeastOnce, false, "after")
        .await
        .unwrap();
    publ.wait_ack().await;
    assert!(sub.drain_publishes(QUIET).await.is_empty());
}

#[tokio::test]
async fn large_payload_is_delivered_intact() {
    let b = Broker::start();
    let (mut sub, publ) = pair(&b, "big").await;
    sub.subscribe("big/t", QoS::AtLeastOnce).await;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    publ.client
        .publish("big/t", QoS::AtLeastOnce, false, payload.clone())
        .await
        .unwrap();
    let p = sub
        .next_publish(Duration::from_secs(20))
        .await
        .expect("1 MB message");
    assert_eq!(p.payload.len(), payload.len());
    assert!(p.payload[..] == payload[..]);
}

/// The route cache (broker/route_cache.rs) remembers what a repeatedly
/// published topic matched; every subscription change must invalidate it,
/// on the publisher's shard and on the subscriber's.
#[tokio::test]
async fn subscription_changes_apply_to_topics_published_before() {
    let b = Broker::start();
    let publ = rq::connect(rq::opts(b.port, &id_on(0, "cache-pub"))).await;
    let send = |n: usize| {
        let c = publ.client.clone();
        async move {
            for i in 0..n {
                c.publish("cache/t", QoS::AtLeastOnce, false, format!("m{i}"))
                    .await
                    .unwrap();
            }
        }
    };
    // Nobody subscribed: the topic is cached with no match.
    send(5).await;
    tokio::time::sleep(QUIET).await;
    // Same shard first, so that no route message from another shard is what
    // refreshes the publisher's shard.
    let mut local = rq::connect(rq::opts(b.port, &id_on(0, "cache-local"))).await;
    local.subscribe("cache/t", QoS::AtLeastOnce).await;
    send(3).await;
    assert_eq!(local.drain_publishes(QUIET).await.len(), 3, "same shard");
    let mut remote = rq::connect(rq::opts(b.port, &id_on(1, "cache-remote"))).await;
    remote.subscribe("cache/+", QoS::AtLeastOnce).await;
    send(3).await;
    assert_eq!(local.drain_publishes(QUIET).await.len(), 3);
    assert_eq!(remote.drain_publishes(QUIET).await.len(), 3, "other shard");
    // Unsubscribing one must stop its deliveries, not the other's.
    local.client.unsubscribe("cache/t").await.unwrap();
    tokio::time::sleep(QUIET).await;
    send(3).await;
    assert_eq!(local.drain_publishes(QUIET).await.len(), 0, "unsubscribed");
    assert_eq!(remote.drain_publishes(QUIET).await.len(), 3);
    // The remote shard's only subscriber leaves: its route goes away.
    remote.client.unsubscribe("cache/+").await.unwrap();
    local.subscribe("cache/#", QoS::AtLeastOnce).await;
    send(2).await;
    assert_eq!(local.drain_publishes(QUIET).await.len(), 2);
    assert_eq!(remote.drain_publishes(QUIET).await.len(), 0);
    // And the cache was used (counters are published every second here).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(crate::harness::sys_counter(b.port, "route_cache_hits") > 0);
}
