//! What the broker does with each packet a client sends: CONNECT and
//! take-over, PUBLISH and the QoS handshakes, SUBSCRIBE/UNSUBSCRIBE, PING,
//! DISCONNECT, and what happens when a connection ends (will, session).

use super::conn::{CloseReason, Conn, ConnOutbox};
use super::metrics::Metrics;
use super::{home_shard, SessionEntry, Shard, State, Sub};
use crate::session::{ack, Delivery, Message, Outbox, Session};
use crate::store::record::Rec;
use std::hash::{BuildHasher, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use tarta_proto::acl::SubscribeAccess;
use tarta_proto::mqtt::{
    self, reason, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, Property,
    Protocol, QoS, SubAck, SubOptions, Subscribe, UnsubAck, Unsubscribe,
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
    /// The client published beyond its rate: read nothing from it for this long.
    Pause(std::time::Duration),
}

fn protocol_error(what: &str) -> Flow {
    Flow::Close(CloseReason::Protocol(what.to_string()))
}

/// Handles one decoded packet. Whatever it logged gates the connection's
/// output: its answers go out once that is durable.
pub fn on_packet(shard: &Shard, conn: &Rc<Conn>, p: Packet) -> Flow {
    let before = shard.log_marks();
    let flow = handle(shard, conn, p);
    shard.gate_after(conn, before);
    flow
}

fn handle(shard: &Shard, conn: &Rc<Conn>, p: Packet) -> Flow {
    conn.heard(shard.now.get());
    shard.check_security();
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
        Packet::PubRel(a) => {
            let Some(sid) = conn.state.borrow().session else {
                return Flow::Continue;
            };
            let mut st = shard.st.borrow_mut();
            let known = st
                .sessions
                .get_mut(sid)
                .is_some_and(|e| e.session.release_incoming(a.packet_id));
            if known {
                // PUBCOMP lets the client reuse the id: once the broker
                // cannot take a new message with it for a duplicate.
                let rec = Rec::In2Rel {
                    sid: sid as u32,
                    pid: a.packet_id,
                };
                shard.log_rec(&mut st, sid, rec, true);
            }
            let code = if known || !protocol.is_v5() {
                0
            } else {
                reason::PACKET_IDENTIFIER_NOT_FOUND
            };
            let p = Packet::PubComp(ack(a.packet_id, code));
            conn.out.borrow_mut().push_packet(&p, protocol);
            Flow::Continue
        }
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
        Packet::Disconnect(d) => disconnect(shard, conn, d),
        Packet::Auth(_) => protocol_error("AUTH without an authentication method"),
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
            protocol_error("server-to-client packet sent by a client")
        }
    }
}

/// DISCONNECT from the client; 5.0 may change the session expiry.
fn disconnect(shard: &Shard, conn: &Rc<Conn>, d: Disconnect) -> Flow {
    if let Some(new_expiry) = d.properties.session_expiry_interval() {
        let sid = conn.state.borrow().session;
        let mut st = shard.st.borrow_mut();
        if let Some(e) = sid.and_then(|sid| st.sessions.get_mut(sid)) {
            if e.expiry == 0 && new_expiry != 0 {
                // MQTT-3.14.2-2.
                return protocol_error("DISCONNECT sets a session expiry after CONNECT set 0");
            }
            e.expiry = new_expiry;
            e.session.persistent = new_expiry != 0;
        }
    }
    Flow::Close(if d.reason == reason::DISCONNECT_WITH_WILL {
        CloseReason::ClientDisconnectWithWill
    } else {
        CloseReason::ClientDisconnect
    })
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
    let st = &mut *st;
    if let Some(entry) = st.sessions.get_mut(sid) {
        let log = st.log.as_mut().filter(|_| entry.session.logged);
        let bridge = entry.bridge().and_then(|i| shard.cfg.bridges.get(i));
        let mut out = ConnOutbox::logged(conn, shard.now.get(), log, sid).mapped(bridge);
        f(&mut entry.session, &mut out);
        shard.congestion(entry);
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

pub fn refuse(conn: &Conn, protocol: Protocol, v3: u8, v5: u8) -> Flow {
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
fn assign_client_id(shard: &Shard) -> ByteStr {
    let n = shard.next_conn_id.get();
    shard.next_conn_id.set(n + 1);
    let mut salt = std::collections::hash_map::RandomState::new().build_hasher();
    salt.write_u64((n << 10) | shard.id as u64);
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

/// CONNECT on the client id's home shard. A persistent session's record
/// is logged before its CONNACK goes out.
pub fn connect(shard: &Shard, conn: &Rc<Conn>, c: Box<Connect>) -> Flow {
    let before = shard.log_marks();
    let flow = connect_inner(shard, conn, c);
    shard.gate_after(conn, before);
    flow
}

fn connect_inner(shard: &Shard, conn: &Rc<Conn>, c: Box<Connect>) -> Flow {
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
    let max_id = cfg.limits.max_client_id_length;
    if max_id != 0 && c.client_id.len() > max_id {
        Metrics::inc(&shard.metrics.limit_client_id);
        return refuse(conn, protocol, 0x02, reason::CLIENT_IDENTIFIER_NOT_VALID);
    }
    if c.client_id
        .starts_with(crate::config::bridge::SESSION_PREFIX)
    {
        // Bridges' sessions: no client may take one over.
        return refuse(conn, protocol, 0x02, reason::CLIENT_IDENTIFIER_NOT_VALID);
    }
    let mut client_id = c.client_id.clone();
    let mut assigned = false;
    if client_id.is_empty() {
        // MQTT-3.1.3-8 (3.1.1): an empty id needs clean session 1.
        if !cfg.allow_zero_length_clientid || (!v5 && !c.clean_start) {
            return refuse(conn, protocol, 0x02, reason::CLIENT_IDENTIFIER_NOT_VALID);
        }
        client_id = assign_client_id(shard);
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
    let acl = shard.client_acl(&client_id, c.username.as_deref());
    // 3.x: clean session 0 keeps the session (no expiry); 5.0: Session
    // Expiry Interval (0: ends with the connection, 0xFFFFFFFF: never).
    let expiry = if v5 {
        c.properties.session_expiry_interval().unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        u32::MAX
    };
    let persistent = expiry != 0;
    let window = if v5 {
        c.properties
            .receive_maximum()
            .unwrap_or(u16::MAX)
            .min(cfg.max_inflight)
    } else {
        cfg.max_inflight
    };

    let storage_failed = shard
        .st
        .borrow()
        .log
        .as_ref()
        .is_some_and(|l| l.any_failed());
    if persistent && storage_failed {
        // The session could not be stored: refuse rather than promise
        // (3.x: server unavailable).
        return refuse(conn, protocol, 0x03, reason::QUOTA_EXCEEDED);
    }
    let mut st = shard.st.borrow_mut();
    let st = &mut *st;
    let mut session_present = false;
    let existing = st.clients.get(&client_id, &st.sessions);
    let mut sid = None;
    if let Some(old_sid) = existing {
        if let Some(entry) = st.sessions.get_mut(old_sid) {
            if let Some(old) = entry.conn.take() {
                info!(client_id = %client_id, old_peer = %old.peer(), "session taken over");
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
            let sid = st.sessions.insert(Box::new(SessionEntry {
                session,
                conn: None,
                acl: None,
                generation: 0,
                expiry,
                rare: None,
                congested: false,
            }));
            st.clients.insert(sid, &st.sessions);
            sid
        }
    };
    if !persistent {
        // No longer persistent (a 5.0 reconnection with expiry 0).
        shard.log_session_del(st, sid);
    }
    if let Some(entry) = st.sessions.get_mut(sid) {
        entry.conn = Some(conn.clone());
        entry.acl = acl;
        entry.session.persistent = persistent;
        entry.session.window = window.max(1);
        entry.expiry = expiry;
        // A reconnection cancels a delayed will and the session's expiry
        // (MQTT-3.1.3-9): their timers see a newer generation.
        entry.generation = entry.generation.wrapping_add(1);
        entry.set_will(None);
        // For the ACL after a reload (and, logged with a persistent
        // session, after a restart).
        entry.set_username(c.username.clone());
        // Connected: the bound is soft (backpressure), the hard bound 8x.
        entry
            .session
            .set_max_queued(cfg.max_queued_messages.saturating_mul(8));
    }
    {
        let mut cs = conn.state.borrow_mut();
        cs.connected = true;
        cs.session = Some(sid);
        cs.will = c.will.clone().map(Box::new);
        cs.max_packet_out = if v5 {
            c.properties.maximum_packet_size().unwrap_or(0)
        } else {
            0
        };
        cs.alias_max_out = if v5 {
            c.properties.topic_alias_maximum().unwrap_or(0)
        } else {
            0
        };
        cs.problem_info = c.properties.request_problem_information() != Some(0);
        cs.peer_bridge = c.bridge;
    }
    conn.keepalive.set(keepalive);
    shard.schedule(st, conn);
    if persistent {
        shard.log_session(st, sid, 0, c.will.as_ref());
    }

    let mut properties = Properties::default();
    if v5 {
        if assigned {
            properties.push(Property::AssignedClientIdentifier(client_id.clone()));
        }
        if let Some(ka) = server_keepalive {
            properties.push(Property::ServerKeepAlive(ka));
        }
        properties.push(Property::ReceiveMaximum(cfg.receive_maximum));
        properties.push(Property::MaximumPacketSize(cfg.max_packet_size));
        properties.push(Property::TopicAliasMaximum(cfg.topic_alias_maximum));
        properties.push(Property::RetainAvailable(1));
        properties.push(Property::WildcardSubscriptionAvailable(1));
        properties.push(Property::SubscriptionIdentifierAvailable(1));
        properties.push(Property::SharedSubscriptionAvailable(1));
        if c.properties.request_response_information() == Some(1) {
            // MQTT-3.2.2.3.15: a basis for response topics.
            properties.push(Property::ResponseInformation(ByteStr::from(format!(
                "response/{client_id}/"
            ))));
        }
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
            let log = st.log.as_mut().filter(|_| entry.session.logged);
            entry
                .session
                .resume(&mut ConnOutbox::logged(conn, shard.now.get(), log, sid));
            for (key, opts, id) in shared_subs(&entry.session) {
                shard.share_join(st, key, sid, opts, id);
            }
        }
    }
    conn.wake();
    Flow::Continue
}

/// Removes a session and its subscriptions (and routes no longer needed).
pub(crate) fn drop_session(shard: &Shard, st: &mut State, sid: usize) {
    if !st.sessions.contains(sid) {
        return;
    }
    shard.log_session_del(st, sid);
    if let Some(e) = st.sessions.get(sid) {
        st.clients.remove(&e.session.client_id, sid);
    }
    let mut entry = st.sessions.remove(sid);
    if entry.congested {
        entry.conn = None;
        shard.congestion(&mut entry);
    }
    for filter in entry.session.subs.keys() {
        remove_sub(shard, st, sid, filter);
    }
    let moved = entry.session.take_where(|d| d.share.is_some());
    shard.reshare(st, moved);
}

/// Resolves a 5.0 Topic Alias (MQTT-3.3.2-10..12): records it when the
/// topic is given, looks it up when the topic is empty.
fn resolve_alias(shard: &Shard, conn: &Conn, alias: u16, topic: ByteStr) -> Result<ByteStr, Flow> {
    let max = shard.cfg.topic_alias_maximum;
    if alias == 0 || alias > max {
        return Err(Flow::Close(CloseReason::TopicAliasInvalid));
    }
    let mut cs = conn.state.borrow_mut();
    let table = &mut cs.aliases.get_or_insert_with(Default::default).inbound;
    let i = usize::from(alias - 1);
    if table.len() <= i {
        table.resize(i + 1, None);
    }
    if topic.is_empty() {
        table[i]
            .clone()
            .ok_or_else(|| protocol_error("unknown topic alias with an empty topic"))
    } else {
        table[i] = Some(topic.clone());
        Ok(topic)
    }
}

fn publish(shard: &Shard, conn: &Rc<Conn>, protocol: Protocol, mut p: mqtt::Publish) -> Flow {
    if protocol.is_v5() {
        if let Some(alias) = p.properties.topic_alias() {
            match resolve_alias(shard, conn, alias, p.topic.clone()) {
                Ok(t) => p.topic = t,
                Err(flow) => return flow,
            }
            p.properties.remove(0x23); // the alias is per connection
        }
    }
    let Ok(topic) = TopicName::new(p.topic.clone()) else {
        return protocol_error("invalid topic name in PUBLISH (MQTT-3.3.2-2)");
    };
    let looped = protocol.is_v5()
        && !p.properties.is_empty()
        && p.properties.user_properties().any(|(k, v)| {
            k.as_str() == crate::config::bridge::HOPS
                && crate::config::bridge::passed(v.as_str(), &shard.cfg.hop_id)
        });
    Metrics::inc(&shard.metrics.messages_received);
    shard.metrics.received_qos[p.qos as usize].add(1);
    let Some(sid) = conn.state.borrow().session else {
        return Flow::Continue;
    };
    let mut st = shard.st.borrow_mut();
    let st = &mut *st;
    let Some(entry) = st.sessions.get_mut(sid) else {
        return Flow::Continue;
    };
    let limits = &shard.cfg.limits;
    let topic_ok = limits.topic_ok(topic.as_str());
    let allowed = topic_ok && entry.acl.as_ref().is_none_or(|acl| acl.can_publish(&topic));
    if !topic_ok {
        // Treated as the ACL treats a denial: 5.0 hears why.
        Metrics::inc(&shard.metrics.limit_topic);
    } else if !allowed {
        Metrics::inc(&shard.metrics.acl_denied);
        debug!(topic = %topic.as_str(), "publish denied by ACL");
    }
    let denied_code = match (protocol.is_v5(), topic_ok, allowed) {
        (true, false, _) => reason::TOPIC_NAME_INVALID,
        (true, true, false) => reason::NOT_AUTHORIZED,
        _ => 0,
    };
    let link = conn.state.borrow().link;
    let mut pause = None;
    if !link && (limits.max_publish_rate != 0 || limits.max_publish_bytes_rate != 0) {
        let qos0 = p.qos == QoS::AtMostOnce;
        let slot = &mut entry.rare_mut().throttle;
        match super::Throttle::take(slot, limits, p.payload.len(), !qos0) {
            Ok(()) => {}
            Err(_) if qos0 => {
                Metrics::inc(&shard.metrics.publish_rate_dropped);
                return Flow::Continue;
            }
            Err(wait) => {
                // Taken, then read nothing more until the budget is back.
                Metrics::inc(&shard.metrics.publish_rate_paused);
                pause = Some(wait);
            }
        }
    }
    if p.qos != QoS::AtMostOnce && st.log.as_ref().is_some_and(|l| l.any_failed()) {
        // The log cannot take it (disk full, I/O error): no promise. 5.0
        // hears why; a 3.x client is closed without the acknowledgement
        // and resends when it reconnects.
        Metrics::inc(&shard.metrics.refused_storage);
        if !protocol.is_v5() {
            return Flow::Close(CloseReason::StorageFailed);
        }
        quota_exceeded(conn, protocol, &p);
        return Flow::Continue;
    }
    if p.qos != QoS::AtMostOnce
        && denied_code == 0
        && !shard.cfg.bridges.is_empty()
        && shard.bridge_rejects(topic.as_str(), entry.bridge())
    {
        // A full `reject_new` bridge would take it: no promise. 5.0 hears
        // quota exceeded; 3.x gets no acknowledgement (it sends it again
        // when it reconnects).
        if protocol.is_v5() {
            quota_exceeded(conn, protocol, &p);
        }
        return Flow::Continue;
    }
    // A bridged message that already passed this broker: acknowledged,
    // not routed again (bridges in a cycle exchange it once).
    let allowed = allowed && !looped;
    let mut in2 = false;
    let route = match p.qos {
        QoS::AtMostOnce => allowed,
        QoS::AtLeastOnce => {
            let a = Packet::PubAck(ack(p.packet_id, denied_code));
            conn.out.borrow_mut().push_packet(&a, protocol);
            allowed
        }
        QoS::ExactlyOnce
            if entry.session.incoming_qos2_len() >= usize::from(shard.cfg.receive_maximum) =>
        {
            // MQTT-3.3.4-7: more unacknowledged QoS 2 than Receive Maximum.
            return Flow::Close(CloseReason::ReceiveMaximumExceeded);
        }
        QoS::ExactlyOnce => {
            // Only a new packet id is routed: a DUP before PUBREL is not.
            let new = if denied_code == 0 {
                entry.session.incoming_qos2(p.packet_id)
            } else {
                false
            };
            in2 = new;
            let a = Packet::PubRec(ack(p.packet_id, denied_code));
            conn.out.borrow_mut().push_packet(&a, protocol);
            new && allowed
        }
    };
    // Exactly once across a crash: the id is known until PUBREL, and the
    // message is routed only once the id and the message are durable here
    // (`Shard::hold_qos2`), so that either both the PUBREC's promise and
    // the message exist after a crash, or neither.
    let logged = in2 && st.log.is_some() && st.sessions.get(sid).is_some_and(|e| e.session.logged);
    conn.wake();
    if route {
        let mut properties = p.properties;
        properties.remove(0x0B); // subscription identifiers are per delivery
        let expires_at = properties
            .message_expiry_interval()
            .map(|s| shard.now.get() + u64::from(s));
        let msg = Arc::new(Message {
            topic: topic.into_inner(),
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            origin: Some((shard.id as u16, sid)),
            expires_at,
            uid: if logged { shard.new_uid(st) } else { 0 },
            stamp: shard.now.get() as u32,
        });
        if logged {
            shard.hold_qos2(st, msg, sid, p.packet_id);
        } else {
            shard.route(st, msg);
        }
    }
    pause.map_or(Flow::Continue, Flow::Pause)
}

/// 5.0: the QoS 1/2 PUBLISH `p` is refused with 0x97 (quota exceeded).
fn quota_exceeded(conn: &Conn, protocol: Protocol, p: &mqtt::Publish) {
    let a = ack(p.packet_id, reason::QUOTA_EXCEEDED);
    let a = match p.qos {
        QoS::AtLeastOnce => Packet::PubAck(a),
        _ => Packet::PubRec(a),
    };
    conn.out.borrow_mut().push_packet(&a, protocol);
    conn.wake();
}

fn subscribe(shard: &Shard, conn: &Rc<Conn>, protocol: Protocol, s: Subscribe) -> Flow {
    let v5 = protocol.is_v5();
    let (sid, peer_bridge) = {
        let cs = conn.state.borrow();
        (cs.session, cs.peer_bridge)
    };
    let Some(sid) = sid else {
        return Flow::Continue;
    };
    let sub_id = if v5 {
        s.properties.subscription_identifiers().next()
    } else {
        None
    };
    let mut st = shard.st.borrow_mut();
    let st = &mut *st;
    let limits = &shard.cfg.limits;
    let mut codes = Vec::with_capacity(s.filters.len());
    let mut batch = SubBatch::default();
    for (raw, opts) in &s.filters {
        let mut opts = *opts;
        if peer_bridge {
            // Mosquitto's bridge rules: not its own messages back, and
            // retain flags as published.
            opts.no_local = true;
            opts.retain_as_published = true;
        }
        let fail = |v5code: u8| if v5 { v5code } else { 0x80 };
        let Ok(filter) = TopicFilter::new(raw.clone()) else {
            codes.push(fail(reason::TOPIC_FILTER_INVALID));
            continue;
        };
        if !limits.topic_ok(raw) {
            Metrics::inc(&shard.metrics.limit_topic);
            codes.push(fail(reason::TOPIC_FILTER_INVALID));
            continue;
        }
        let Some(entry) = st.sessions.get_mut(sid) else {
            return Flow::Continue;
        };
        let max_subs = limits.max_subscriptions_per_client;
        if max_subs != 0
            && entry.session.subs.len() >= max_subs
            && !entry.session.subs.contains_key(raw)
        {
            Metrics::inc(&shard.metrics.limit_subscriptions);
            codes.push(fail(reason::QUOTA_EXCEEDED));
            continue;
        }
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
        codes.push(opts.qos as u8);
        batch.add(shard, st, sid, raw, &filter, opts, sub_id, filtered);
    }
    let suback = Packet::SubAck(SubAck {
        packet_id: s.packet_id,
        codes,
        properties: Properties::default(),
    });
    let (retained, changed) = batch.finish(shard, st, sid);
    shard.suback(st, conn, sid, suback, retained, changed);
    Flow::Continue
}

/// Subscriptions added to one session in one go: what they log, the
/// routes they create and the retained messages they get.
#[derive(Default)]
pub(crate) struct SubBatch {
    retained: Vec<Delivery>,
    new_routes: Vec<ByteStr>,
    share_changed: bool,
    logged: Vec<Rec>,
}

impl SubBatch {
    /// Adds (or replaces) one subscription: the session, the local index
    /// or the shared group, and the retained messages it gets.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add(
        &mut self,
        shard: &Shard,
        st: &mut State,
        sid: usize,
        raw: &ByteStr,
        filter: &TopicFilter,
        opts: SubOptions,
        sub_id: Option<u32>,
        filtered: bool,
    ) {
        let Some(entry) = st.sessions.get_mut(sid) else {
            return;
        };
        let existed = entry
            .session
            .subs
            .insert(raw.clone(), (opts, sub_id))
            .is_some();
        self.logged.push(Rec::Sub {
            sid: sid as u32,
            filter: raw.clone(),
            opts,
            sub_id,
        });
        if let Some(key) = share_key(filter) {
            // MQTT-4.8.2: no retained messages for a shared subscription.
            self.share_changed |= shard.share_join(st, key, sid, opts, sub_id);
            return;
        }
        if !st.index.contains_filter(raw) {
            self.new_routes.push(raw.clone());
        }
        st.route_gen += 1;
        st.index.insert(
            raw,
            sid,
            Sub {
                opts,
                sub_id,
                filtered,
            },
        );
        if opts.retain_handling == 0 || (opts.retain_handling == 1 && !existed) {
            let acl = st.sessions.get(sid).and_then(|e| e.acl.as_ref());
            let retained = &mut self.retained;
            st.retained.matching(raw, |m| {
                if filtered && !acl.is_none_or(|a| a.can_read(&m.topic)) {
                    return;
                }
                retained.push(Delivery {
                    msg: m.clone(),
                    qos: opts.qos.min(m.qos),
                    retain: true,
                    sub_ids: sub_id.into_iter().collect(),
                    share: None,
                });
            });
        }
    }

    /// Logs the subscriptions and announces new routes. Returns the
    /// retained messages to deliver and whether other shards must apply
    /// route changes before the SUBACK.
    pub(crate) fn finish(self, shard: &Shard, st: &mut State, sid: usize) -> (Vec<Delivery>, bool) {
        for rec in self.logged {
            shard.log_rec(st, sid, rec, true);
        }
        for f in &self.new_routes {
            shard.route_change(st, f, true);
        }
        let changed =
            !self.new_routes.is_empty() || self.share_changed || std::mem::take(&mut st.announce);
        (self.retained, changed)
    }
}

/// (group, filter) of a `$share/{group}/{filter}` subscription.
fn share_key(filter: &TopicFilter) -> Option<(ByteStr, ByteStr)> {
    filter
        .share()
        .map(|(g, f)| (ByteStr::from(g), ByteStr::from(f)))
}

/// Removes one subscription of `sid` from the index or its shared group.
fn remove_sub(shard: &Shard, st: &mut State, sid: usize, raw: &ByteStr) {
    match TopicFilter::new(raw.clone())
        .ok()
        .as_ref()
        .and_then(share_key)
    {
        Some(key) => shard.share_leave(st, &key, sid),
        None => {
            st.index.remove(raw, &sid);
            st.route_gen += 1;
            if !st.index.contains_filter(raw) {
                shard.route_change(st, raw, false);
            }
        }
    }
}

/// The session's shared subscriptions, as (group, filter) with options.
fn shared_subs(session: &Session) -> Vec<((ByteStr, ByteStr), SubOptions, Option<u32>)> {
    session
        .subs
        .iter()
        .filter(|(raw, _)| raw.starts_with("$share/"))
        .filter_map(|(raw, (opts, id))| {
            let f = TopicFilter::new(raw.clone()).ok()?;
            Some((share_key(&f)?, *opts, *id))
        })
        .collect()
}

/// Removes one subscription of `sid` (logged). False if it had none.
pub(crate) fn unsubscribe_one(shard: &Shard, st: &mut State, sid: usize, f: &ByteStr) -> bool {
    let existed = st
        .sessions
        .get_mut(sid)
        .is_some_and(|e| e.session.subs.remove(f).is_some());
    if existed {
        remove_sub(shard, st, sid, f);
        let rec = Rec::Unsub {
            sid: sid as u32,
            filter: f.clone(),
        };
        shard.log_rec(st, sid, rec, true);
    }
    existed
}

fn unsubscribe(shard: &Shard, conn: &Rc<Conn>, protocol: Protocol, u: Unsubscribe) -> Flow {
    let Some(sid) = conn.state.borrow().session else {
        return Flow::Continue;
    };
    let mut st = shard.st.borrow_mut();
    let st = &mut *st;
    let mut codes = Vec::new();
    for f in &u.filters {
        let existed = unsubscribe_one(shard, st, sid, f);
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

/// The connection is gone: detach or drop its session, publish its will
/// (now, or after its Will Delay Interval while the session lives on).
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
    let will = will.filter(|_| why.publishes_will());
    let delay = will
        .as_ref()
        .and_then(|w| w.properties.will_delay_interval())
        .filter(|d| *d > 0);
    let Some(entry) = sid.and_then(|sid| st.sessions.get_mut(sid)) else {
        if let Some(w) = will {
            shard.publish_will(st, *w);
        }
        return;
    };
    let sid = sid.unwrap_or_default();
    let will_allowed = match (&will, &entry.acl) {
        (Some(w), Some(acl)) => acl.can_publish(&w.topic),
        _ => true,
    };
    let will = will.filter(|_| will_allowed);
    let owns = entry.conn.as_ref().is_some_and(|c| Rc::ptr_eq(c, conn));
    if !owns {
        // Taken over: a new connection to the session exists, so a
        // delayed will is not sent (MQTT-3.1.3-9); an immediate one is.
        if let (Some(w), None) = (will, delay) {
            shard.publish_will(st, *w);
        }
        return;
    }
    entry.conn = None;
    entry.session.set_max_queued(shard.cfg.max_queued_messages);
    shard.congestion(entry);
    // Shared subscriptions deliver only to connected members: leave the
    // groups, and hand what this member had not acknowledged to another.
    let shares = shared_subs(&entry.session);
    let moved = entry.session.take_where(|d| d.share.is_some());
    if !moved.is_empty() {
        shard.log_rec(st, sid, Rec::Unshare { sid: sid as u32 }, false);
    }
    for (key, _, _) in &shares {
        shard.share_leave(st, key, sid);
    }
    shard.reshare(st, moved);
    let Some(entry) = st.sessions.get_mut(sid) else {
        return;
    };
    if entry.expiry == 0 {
        drop_session(shard, st, sid);
        if let Some(w) = will {
            shard.publish_will(st, *w);
        }
        return;
    }
    if entry.session.logged {
        // Offline from now (its expiry counts from here), with the will
        // still due, if delayed.
        let pending = will.as_deref().filter(|_| delay.is_some()).cloned();
        shard.log_session(st, sid, crate::store::unix_now().max(1), pending.as_ref());
    }
    let Some(entry) = st.sessions.get_mut(sid) else {
        return;
    };
    match (will, delay) {
        (Some(w), Some(_)) => {
            entry.set_will(Some(*w));
            shard.session_offline(st, sid, delay);
        }
        (Some(w), None) => {
            shard.session_offline(st, sid, None);
            shard.publish_will(st, *w);
        }
        (None, _) => shard.session_offline(st, sid, None),
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
        let mut properties = Properties::default();
        if conn.state.borrow().problem_info {
            properties.push(Property::ReasonString(ByteStr::from(why.description())));
        }
        let p = Packet::Disconnect(Disconnect {
            reason: code,
            properties,
        });
        conn.out.borrow_mut().push_packet(&p, protocol);
    }
}
