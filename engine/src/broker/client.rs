//! What the broker does with each packet a client sends: CONNECT and
//! take-over, PUBLISH and the QoS handshakes, SUBSCRIBE/UNSUBSCRIBE, PING,
//! DISCONNECT, and what happens when a connection ends (will, session).

use super::conn::{CloseReason, Conn, ConnOutbox};
use super::metrics::Metrics;
use super::{home_shard, SessionEntry, Shard, State, Sub};
use crate::session::{ack, Delivery, Message, Outbox, Session};
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use tarta_proto::acl::SubscribeAccess;
use tarta_proto::mqtt::{
    self, reason, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, Property,
    Protocol, QoS, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use tarta_proto::topic::{TopicFilter, TopicName};
use tarta_proto::ByteStr;
use tracing::{debug, info};

/// What the connection's task does next.
pub enum Flow {
    Continue,
    Close(CloseReason),
    /// The client id lives on another shard: move the connection there.
    Handoff(Box<Connect>),
}

fn protocol_error(what: &str) -> Flow {
    Flow::Close(CloseReason::Protocol(what.to_string()))
}

/// Handles one decoded packet.
pub fn on_packet(shard: &Shard, conn: &Rc<Conn>, p: Packet) -> Flow {
    conn.last_heard.set(shard.now.get());
    let (connected, protocol) = {
        let st = conn.state.borrow();
        (st.connected, st.protocol)
    };
    if !connected {
        return match p {
            Packet::Connect(c) => {
                if !c.client_id.is_empty() && home_shard(&c.client_id, shard.n) != shard.id {
                    return Flow::Handoff(c);
                }
                connect(shard, conn, c)
            }
            _ => protocol_error("the first packet must be CONNECT (MQTT-3.1.0-1)"),
        };
    }
    match p {
        Packet::Connect(_) => protocol_error("second CONNECT (MQTT-3.1.0-2)"),
        Packet::Publish(p) => publish(shard, conn, protocol, p),
        Packet::PubAck(a) => with_session(shard, conn, |s, out| {
            s.on_puback(a.packet_id, out);
        }),
        Packet::PubRec(a) => with_session(shard, conn, |s, out| {
            if !s.on_pubrec(a.packet_id, a.reason, out) {
                let code = if protocol.is_v5() {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                } else {
                    0
                };
                out.packet(Packet::PubRel(ack(a.packet_id, code)));
            }
        }),
        Packet::PubRel(a) => with_session(shard, conn, |s, out| {
            let known = s.release_incoming(a.packet_id);
            let code = if known || !protocol.is_v5() {
                0
            } else {
                reason::PACKET_IDENTIFIER_NOT_FOUND
            };
            out.packet(Packet::PubComp(ack(a.packet_id, code)));
        }),
        Packet::PubComp(a) => with_session(shard, conn, |s, out| {
            s.on_pubcomp(a.packet_id, out);
        }),
        Packet::Subscribe(s) => subscribe(shard, conn, protocol, s),
        Packet::Unsubscribe(u) => unsubscribe(shard, conn, protocol, u),
        Packet::PingReq => {
            conn.out
                .borrow_mut()
                .push_packet(&Packet::PingResp, protocol);
            Flow::Continue
        }
        Packet::Disconnect(d) => Flow::Close(if d.reason == reason::DISCONNECT_WITH_WILL {
            CloseReason::ClientDisconnectWithWill
        } else {
            CloseReason::ClientDisconnect
        }),
        Packet::Auth(_) => protocol_error("AUTH without an authentication method"),
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
            protocol_error("server-to-client packet sent by a client")
        }
    }
}

/// Runs `f` on the connection's session with the connection as outbox.
fn with_session(
    shard: &Shard,
    conn: &Rc<Conn>,
    f: impl FnOnce(&mut Session, &mut ConnOutbox<'_>),
) -> Flow {
    let Some(sid) = conn.state.borrow().session else {
        return Flow::Continue;
    };
    let mut st = shard.st.borrow_mut();
    if let Some(entry) = st.sessions.get_mut(sid) {
        let mut out = ConnOutbox::new(conn);
        f(&mut entry.session, &mut out);
    }
    Flow::Continue
}

/// A packet the decoder rejected: answers what the spec asks and says why
/// the connection closes.
pub fn on_decode_error(conn: &Conn, e: &DecodeError) -> CloseReason {
    let connected = conn.state.borrow().connected;
    match e {
        DecodeError::UnsupportedProtocolVersion(level) if !connected => {
            // MQTT-3.1.2-2: CONNACK 0x01 (3.1.1 encoding: the client's level is unknown).
            conn.out.borrow_mut().push_bytes(&[0x20, 0x02, 0x00, 0x01]);
            CloseReason::Protocol(format!("unsupported protocol level {level}"))
        }
        DecodeError::PacketTooLarge { .. } => CloseReason::PacketTooLarge(e.to_string()),
        DecodeError::Malformed(_) => CloseReason::Malformed(e.to_string()),
        _ => CloseReason::Protocol(e.to_string()),
    }
}

fn refuse(conn: &Conn, protocol: Protocol, v3: u8, v5: u8) -> Flow {
    let code = if protocol.is_v5() { v5 } else { v3 };
    let p = Packet::ConnAck(ConnAck {
        session_present: false,
        code,
        properties: Properties::default(),
    });
    conn.out.borrow_mut().push_packet(&p, protocol);
    Flow::Close(CloseReason::Refused)
}

/// A client id that hashes to this shard, so the client needs no handoff.
fn assign_client_id(shard: &Shard, conn: &Conn) -> ByteStr {
    let mut salt = std::collections::hash_map::RandomState::new().build_hasher();
    salt.write_u64(conn.id);
    let salt = salt.finish();
    let mut i: u64 = 0;
    loop {
        let id = format!("tarta-{:016x}-{i}", salt);
        if home_shard(&id, shard.n) == shard.id {
            return ByteStr::from(id);
        }
        i += 1;
    }
}

/// CONNECT on the client id's home shard.
pub fn connect(shard: &Shard, conn: &Rc<Conn>, c: Box<Connect>) -> Flow {
    let cfg = &shard.cfg;
    let protocol = c.protocol;
    let v5 = protocol.is_v5();
    conn.state.borrow_mut().protocol = protocol;

    if v5 && c.properties.authentication_method().is_some() {
        return refuse(conn, protocol, 0x05, reason::BAD_AUTHENTICATION_METHOD);
    }
    let mut keepalive = c.keep_alive;
    let mut server_keepalive = None;
    if cfg.max_keepalive < u16::MAX && (keepalive > cfg.max_keepalive || keepalive == 0) {
        if v5 {
            keepalive = cfg.max_keepalive;
            server_keepalive = Some(cfg.max_keepalive);
        } else if keepalive > cfg.max_keepalive {
            // Mosquitto's rule: a 3.x client cannot be told, so it is refused.
            return refuse(conn, protocol, 0x02, reason::CLIENT_IDENTIFIER_NOT_VALID);
        }
    }
    let mut client_id = c.client_id.clone();
    let mut assigned = false;
    if client_id.is_empty() {
        // MQTT-3.1.3-8 (3.1.1): an empty id needs clean session 1.
        if !cfg.allow_zero_length_clientid || (!v5 && !c.clean_start) {
            return refuse(conn, protocol, 0x02, reason::CLIENT_IDENTIFIER_NOT_VALID);
        }
        client_id = assign_client_id(shard, conn);
        assigned = true;
    }
    if let Some(w) = &c.will {
        if TopicName::new(w.topic.clone()).is_err() {
            return match protocol {
                Protocol::V5 => refuse(conn, protocol, 0, reason::TOPIC_NAME_INVALID),
                _ => Flow::Close(CloseReason::Protocol("invalid will topic".into())),
            };
        }
    }
    let acl = shard
        .acl
        .as_ref()
        .map(|a| a.for_client(&client_id, c.username.as_deref()));
    let persistent = if v5 {
        c.properties.session_expiry_interval().unwrap_or(0) > 0
    } else {
        !c.clean_start
    };
    let window = if v5 {
        c.properties
            .receive_maximum()
            .unwrap_or(u16::MAX)
            .min(cfg.max_inflight)
    } else {
        cfg.max_inflight
    };

    let mut st = shard.st.borrow_mut();
    let st = &mut *st;
    let mut session_present = false;
    let existing = st.clients.get(&client_id).copied();
    let mut sid = None;
    if let Some(old_sid) = existing {
        if let Some(entry) = st.sessions.get_mut(old_sid) {
            if let Some(old) = entry.conn.take() {
                info!(client_id = %client_id, old_peer = %old.peer.get(), "session taken over");
                old.request_close(CloseReason::TakenOver);
            }
            if c.clean_start || !entry.session.persistent {
                drop_session(shard, st, old_sid);
            } else {
                session_present = true;
                sid = Some(old_sid);
            }
        }
    }
    let sid = match sid {
        Some(sid) => sid,
        None => {
            let session = Session::new(
                client_id.clone(),
                persistent,
                window,
                cfg.max_queued_messages,
            );
            let sid = st.sessions.insert(SessionEntry {
                session,
                conn: None,
                acl: None,
            });
            st.clients.insert(client_id.clone(), sid);
            sid
        }
    };
    if let Some(entry) = st.sessions.get_mut(sid) {
        entry.conn = Some(conn.clone());
        entry.acl = acl;
        entry.session.persistent = persistent;
        entry.session.window = window.max(1);
    }
    {
        let mut cs = conn.state.borrow_mut();
        cs.connected = true;
        cs.client_id = client_id.clone();
        cs.session = Some(sid);
        cs.will = c.will.clone().map(Box::new);
        cs.max_packet_out = if v5 {
            c.properties.maximum_packet_size().unwrap_or(0)
        } else {
            0
        };
    }
    conn.keepalive.set(keepalive);
    shard.schedule(st, conn);

    let mut properties = Properties::default();
    if v5 {
        if assigned {
            properties.push(Property::AssignedClientIdentifier(client_id.clone()));
        }
        if let Some(ka) = server_keepalive {
            properties.push(Property::ServerKeepAlive(ka));
        }
        properties.push(Property::MaximumPacketSize(cfg.max_packet_size));
        properties.push(Property::SharedSubscriptionAvailable(0));
    }
    let connack = Packet::ConnAck(ConnAck {
        session_present,
        code: 0,
        properties,
    });
    conn.out.borrow_mut().push_packet(&connack, protocol);
    debug!(client_id = %client_id, session_present, persistent, keepalive, "connected");
    if session_present {
        if let Some(entry) = st.sessions.get_mut(sid) {
            entry.session.resume(&mut ConnOutbox::new(conn));
        }
    }
    conn.wake();
    Flow::Continue
}

/// Removes a session and its subscriptions (and routes no longer needed).
fn drop_session(shard: &Shard, st: &mut State, sid: usize) {
    if !st.sessions.contains(sid) {
        return;
    }
    let entry = st.sessions.remove(sid);
    st.clients.remove(&entry.session.client_id);
    for filter in entry.session.subs.keys() {
        st.index.remove(filter, &sid);
        if !st.index.contains_filter(filter) {
            shard.route_change(st, filter, false);
        }
    }
}

fn publish(shard: &Shard, conn: &Rc<Conn>, protocol: Protocol, p: mqtt::Publish) -> Flow {
    if protocol.is_v5() && p.properties.topic_alias().is_some() {
        // CONNACK advertised no topic aliases (Topic Alias Maximum 0).
        return Flow::Close(CloseReason::TopicAliasInvalid);
    }
    let Ok(topic) = TopicName::new(p.topic.clone()) else {
        return protocol_error("invalid topic name in PUBLISH (MQTT-3.3.2-2)");
    };
    Metrics::inc(&shard.metrics.messages_received);
    let Some(sid) = conn.state.borrow().session else {
        return Flow::Continue;
    };
    let mut st = shard.st.borrow_mut();
    let st = &mut *st;
    let Some(entry) = st.sessions.get_mut(sid) else {
        return Flow::Continue;
    };
    let allowed = entry.acl.as_ref().is_none_or(|acl| acl.can_publish(&topic));
    if !allowed {
        Metrics::inc(&shard.metrics.acl_denied);
        debug!(topic = %topic.as_str(), "publish denied by ACL");
    }
    let denied_code = if protocol.is_v5() && !allowed {
        reason::NOT_AUTHORIZED
    } else {
        0
    };
    let route = match p.qos {
        QoS::AtMostOnce => allowed,
        QoS::AtLeastOnce => {
            let a = Packet::PubAck(ack(p.packet_id, denied_code));
            conn.out.borrow_mut().push_packet(&a, protocol);
            allowed
        }
        QoS::ExactlyOnce => {
            // Only a new packet id is routed: a DUP before PUBREL is not.
            let new = if denied_code == 0 {
                entry.session.incoming_qos2(p.packet_id)
            } else {
                false
            };
            let a = Packet::PubRec(ack(p.packet_id, denied_code));
            conn.out.borrow_mut().push_packet(&a, protocol);
            new && allowed
        }
    };
    conn.wake();
    if route {
        let mut properties = p.properties;
        properties.remove(0x0B); // subscription identifiers are per delivery
        let msg = Arc::new(Message {
            topic: topic.into_inner(),
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            origin: Some((shard.id as u16, sid)),
        });
        shard.route(st, msg);
    }
    Flow::Continue
}

fn subscribe(shard: &Shard, conn: &Rc<Conn>, protocol: Protocol, s: Subscribe) -> Flow {
    let v5 = protocol.is_v5();
    let Some(sid) = conn.state.borrow().session else {
        return Flow::Continue;
    };
    let sub_id = if v5 {
        s.properties.subscription_identifiers().next()
    } else {
        None
    };
    let mut st = shard.st.borrow_mut();
    let st = &mut *st;
    let mut codes = Vec::with_capacity(s.filters.len());
    let mut retained = Vec::new();
    let mut new_routes = Vec::new();
    for (raw, opts) in &s.filters {
        let fail = |v5code: u8| if v5 { v5code } else { 0x80 };
        let Ok(filter) = TopicFilter::new(raw.clone()) else {
            codes.push(fail(reason::TOPIC_FILTER_INVALID));
            continue;
        };
        if filter.share().is_some() {
            codes.push(fail(reason::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED));
            continue;
        }
        let Some(entry) = st.sessions.get_mut(sid) else {
            return Flow::Continue;
        };
        let access = entry
            .acl
            .as_ref()
            .map_or(SubscribeAccess::Granted, |acl| acl.subscribe(raw));
        if access == SubscribeAccess::Denied {
            Metrics::inc(&shard.metrics.acl_denied);
            codes.push(fail(reason::NOT_AUTHORIZED));
            continue;
        }
        let filtered = access == SubscribeAccess::GrantedFiltered;
        let existed = entry.session.subs.insert(raw.clone(), *opts).is_some();
        if !st.index.contains_filter(raw) {
            new_routes.push(raw.clone());
        }
        st.index.insert(
            raw,
            sid,
            Sub {
                opts: *opts,
                sub_id,
                filtered,
            },
        );
        codes.push(opts.qos as u8);
        if opts.retain_handling == 0 || (opts.retain_handling == 1 && !existed) {
            let acl = entry.acl.as_ref();
            st.retained.matching(raw, |m| {
                if filtered && !acl.is_none_or(|a| a.can_read(&m.topic)) {
                    return;
                }
                retained.push(Delivery {
                    msg: m.clone(),
                    qos: opts.qos.min(m.qos),
                    retain: true,
                    sub_ids: sub_id.into_iter().collect(),
                });
            });
        }
    }
    for f in &new_routes {
        shard.route_change(st, f, true);
    }
    let suback = Packet::SubAck(SubAck {
        packet_id: s.packet_id,
        codes,
        properties: Properties::default(),
    });
    shard.suback(st, conn, sid, suback, retained, !new_routes.is_empty());
    Flow::Continue
}

fn unsubscribe(shard: &Shard, conn: &Rc<Conn>, protocol: Protocol, u: Unsubscribe) -> Flow {
    let Some(sid) = conn.state.borrow().session else {
        return Flow::Continue;
    };
    let mut st = shard.st.borrow_mut();
    let st = &mut *st;
    let mut codes = Vec::new();
    for f in &u.filters {
        let existed = st
            .sessions
            .get_mut(sid)
            .is_some_and(|e| e.session.subs.remove(f).is_some());
        if existed {
            st.index.remove(f, &sid);
            if !st.index.contains_filter(f) {
                shard.route_change(st, f, false);
            }
        }
        if protocol.is_v5() {
            codes.push(if existed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
        }
    }
    let p = Packet::UnsubAck(UnsubAck {
        packet_id: u.packet_id,
        codes,
        properties: Properties::default(),
    });
    conn.out.borrow_mut().push_packet(&p, protocol);
    Flow::Continue
}

/// The connection is gone: detach or drop its session, publish its will.
pub fn on_closed(shard: &Shard, conn: &Rc<Conn>, why: &CloseReason) {
    Metrics::dec(&shard.metrics.connections_current);
    if matches!(
        why,
        CloseReason::KeepAliveTimeout | CloseReason::ConnectTimeout
    ) {
        Metrics::inc(&shard.metrics.closed_keepalive);
    }
    let (connected, sid, will) = {
        let mut cs = conn.state.borrow_mut();
        (cs.connected, cs.session.take(), cs.will.take())
    };
    if !connected {
        return;
    }
    let mut st = shard.st.borrow_mut();
    let st = &mut *st;
    let mut will_allowed = true;
    if let Some(sid) = sid {
        if let Some(entry) = st.sessions.get_mut(sid) {
            if let (Some(w), Some(acl)) = (&will, &entry.acl) {
                will_allowed = acl.can_publish(&w.topic);
            }
            let owns = entry.conn.as_ref().is_some_and(|c| Rc::ptr_eq(c, conn));
            if owns {
                entry.conn = None;
                if !entry.session.persistent {
                    drop_session(shard, st, sid);
                }
            }
        }
    }
    if let Some(w) = will.filter(|_| why.publishes_will() && will_allowed) {
        let w = *w;
        let mut properties = w.properties;
        properties.remove(0x18); // Will Delay Interval is not a PUBLISH property
        let msg = Arc::new(Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            properties,
            origin: None,
        });
        shard.route(st, msg);
    }
}

/// The DISCONNECT a 5.0 client gets before the server closes, if any.
pub fn server_disconnect(conn: &Conn, why: &CloseReason) {
    let (connected, protocol) = {
        let cs = conn.state.borrow();
        (cs.connected, cs.protocol)
    };
    if !connected || !protocol.is_v5() {
        return;
    }
    if let Some(code) = why.disconnect_code() {
        let p = Packet::Disconnect(Disconnect {
            reason: code,
            properties: Properties::default(),
        });
        conn.out.borrow_mut().push_packet(&p, protocol);
    }
}
