#!/usr/bin/env node
// MQTT over WebSocket interop checks with MQTT.js in Node.js.
//
//   node tests/interop/ws_mqttjs.mjs --tcp TCPPORT --ws WSPORT [CHECK ...]
//   node tests/interop/ws_mqttjs.mjs --list
//
// Against a Tarta on 127.0.0.1 started with --shards 2: MQTT.js over
// ws://127.0.0.1:WSPORT/mqtt talks to MQTT.js over mqtt://127.0.0.1:TCPPORT,
// the two homed on different shards. Prints `ok - NAME` / `not ok - NAME: why`
// per check; exits 1 if any failed. Every wait is bounded (INTEROP_WAIT).

import { Clients, expectMessages, fail, main, pickId, requirePort, sleep } from './lib.mjs';

let WS_URL;
let TCP_URL;

const VERSIONS = { v311: 4, v5: 5 };

// N messages at QoS q from one transport to the other, publisher homed on
// shard 0 and subscriber on shard 1: exact payloads, order, QoS, retain 0.
async function roundTrip(v, q, dir, n = 100) {
    const pv = VERSIONS[v];
    const topic = `mqttjs/rt/${v}/q${q}/${dir}`;
    const [pubUrl, subUrl] = dir === 'ws-to-tcp' ? [WS_URL, TCP_URL] : [TCP_URL, WS_URL];
    const tag = `j${v}q${q}${dir === 'ws-to-tcp' ? 'w' : 't'}`;
    const cl = new Clients();
    try {
        const sub = await cl.open(`subscriber (${dir.split('-to-')[1]})`, subUrl, {
            clientId: pickId(`${tag}s`, 1),
            protocolVersion: pv,
        });
        const pub = await cl.open(`publisher (${dir.split('-to-')[0]})`, pubUrl, {
            clientId: pickId(`${tag}p`, 0),
            protocolVersion: pv,
        });
        await sub.subscribe([[topic, q]]);
        const payloads = Array.from({ length: n }, (_, i) => `${tag}-${i}`);
        await pub.publishAll(topic, payloads, q);
        await sub.waitCount(topic, n);
        await sleep(300); // duplicates, if any, would arrive now
        expectMessages(
            'subscriber',
            sub.received(),
            payloads.map((payload) => ({ topic, payload, qos: q, retain: false })),
        );
    } finally {
        cl.closeAll();
    }
}

// A retained message published over TCP reaches a late WebSocket subscriber
// (3.1.1 and 5, other shard) with the retain flag; once cleared, a new
// subscriber gets nothing for the topic.
async function retained() {
    const topic = 'mqttjs/retain/t';
    const sentinel = 'mqttjs/retain/sentinel';
    const cl = new Clients();
    try {
        const pub = await cl.open('tcp publisher', TCP_URL, { clientId: pickId('jretp', 0), protocolVersion: 4 });
        await pub.publishAll(topic, ['kept-1'], 1, { retain: true });
        for (const [v, pv] of Object.entries(VERSIONS)) {
            const late = await cl.open(`late ws subscriber ${v}`, WS_URL, {
                clientId: pickId(`jret${v}`, 1),
                protocolVersion: pv,
            });
            await late.subscribe([[topic, 1]]);
            await late.waitCount(topic, 1);
            await sleep(300);
            expectMessages(`late ws subscriber ${v}`, late.received(), [
                { topic, payload: 'kept-1', qos: 1, retain: true },
            ]);
        }
        // Clear it (empty retained payload); a sentinel proves delivery works.
        await pub.publishAll(topic, [''], 1, { retain: true });
        await pub.publishAll(sentinel, ['here'], 1, { retain: true });
        const after = await cl.open('ws subscriber after clearing', WS_URL, {
            clientId: pickId('jretafter', 1),
            protocolVersion: 5,
        });
        await after.subscribe([
            [topic, 1],
            [sentinel, 1],
        ]);
        await after.waitCount(sentinel, 1);
        await sleep(500);
        expectMessages('ws subscriber after clearing', after.received(), [
            { topic: sentinel, payload: 'here', qos: 1, retain: true },
        ]);
        await pub.publishAll(sentinel, [''], 1, { retain: true });
    } finally {
        cl.closeAll();
    }
}

// A WebSocket client's will: published when its socket is destroyed
// (client.stream.destroy(): no DISCONNECT), not after end() (DISCONNECT).
async function will(v) {
    const pv = VERSIONS[v];
    const wt = `mqttjs/will/${v}`;
    const cl = new Clients();
    try {
        const watcher = await cl.open('tcp watcher', TCP_URL, { clientId: pickId(`jw${v}w`, 0), protocolVersion: pv });
        await watcher.subscribe([[wt, 1]]);
        const willOpts = (payload) => ({
            clientId: pickId(`jw${v}c`, 1),
            protocolVersion: pv,
            will: { topic: wt, payload: Buffer.from(payload), qos: 1, retain: false },
        });
        // 1. Socket destroyed: the will must arrive.
        const dying = await cl.open('ws client (destroyed)', WS_URL, willOpts(`gone-${v}`));
        dying.c.stream.destroy();
        try {
            await watcher.waitCount(wt, 1);
        } catch (e) {
            fail(`will not delivered after the WebSocket was destroyed: ${e.message}`);
        }
        // 2. Clean end(): no will.
        const clean = await cl.open('ws client (clean end)', WS_URL, willOpts(`bad-${v}`));
        await clean.end();
        await sleep(1500); // a wrongly published will would be on its way by now
        const pub = await cl.open('tcp publisher', TCP_URL, { clientId: pickId(`jw${v}p`, 0), protocolVersion: pv });
        await pub.publishAll(wt, ['sentinel'], 1);
        await watcher.waitCount(wt, 2);
        await sleep(300);
        expectMessages('tcp watcher', watcher.received(), [
            { topic: wt, payload: `gone-${v}`, qos: 1, retain: false },
            { topic: wt, payload: 'sentinel', qos: 1, retain: false },
        ]);
    } finally {
        cl.closeAll();
    }
}

// A persistent WebSocket session (clean false; v5: Session Expiry Interval)
// subscribes at QoS 1 and leaves; 3 QoS 1 messages from TCP are queued and
// delivered in order when it comes back (CONNACK session present).
async function persistent(v) {
    const pv = VERSIONS[v];
    const topic = `mqttjs/persist/${v}`;
    const id = pickId(`jps${v}`, 1);
    const cleanOpts = { clientId: id, protocolVersion: pv, clean: true };
    const opts = {
        clientId: id,
        protocolVersion: pv,
        clean: false,
        ...(pv === 5 ? { properties: { sessionExpiryInterval: 300 } } : {}),
    };
    const cl = new Clients();
    try {
        // Start from no session at all.
        const fresh = await cl.open('ws client (clean)', WS_URL, cleanOpts);
        await fresh.end();
        const first = await cl.open('ws client (first)', WS_URL, opts);
        if (first.connack.sessionPresent) fail('first CONNACK after a clean session says session present');
        await first.subscribe([[topic, 1]]);
        await first.end();
        const pub = await cl.open('tcp publisher', TCP_URL, { clientId: pickId(`jps${v}p`, 0), protocolVersion: pv });
        const payloads = ['persist-1', 'persist-2', 'persist-3'];
        await pub.publishAll(topic, payloads, 1);
        const back = await cl.open('ws client (back)', WS_URL, opts);
        if (!back.connack.sessionPresent) fail('CONNACK on return: session present is 0');
        await back.waitCount(topic, 3);
        await sleep(500);
        expectMessages(
            'ws client (back)',
            back.received(),
            payloads.map((payload) => ({ topic, payload, qos: 1, retain: false })),
        );
        await back.end();
        // Leave no session behind.
        const bye = await cl.open('ws client (cleanup)', WS_URL, cleanOpts);
        await bye.end();
    } finally {
        cl.closeAll();
    }
}

// Both protocol versions connect over WebSocket; the session is usable.
async function connectOnly(v) {
    const cl = new Clients();
    try {
        const c = await cl.open(`ws ${v}`, WS_URL, { clientId: pickId(`jc${v}`, 1), protocolVersion: VERSIONS[v] });
        const topic = `mqttjs/connect/${v}`;
        await c.subscribe([[topic, 1]]);
        await c.publishAll(topic, ['self'], 1);
        await c.waitCount(topic, 1);
        await c.end();
    } finally {
        cl.closeAll();
    }
}

const CHECKS = {};
for (const v of Object.keys(VERSIONS)) {
    CHECKS[`ws-${v}-connect`] = () => connectOnly(v);
}
for (const v of Object.keys(VERSIONS)) {
    for (const q of [0, 1, 2]) {
        for (const dir of ['ws-to-tcp', 'tcp-to-ws']) {
            CHECKS[`ws-${v}-qos${q}-${dir}-cross-shard`] = () => roundTrip(v, q, dir);
        }
    }
}
CHECKS['ws-retained-to-late-subscriber'] = retained;
for (const v of Object.keys(VERSIONS)) {
    CHECKS[`ws-${v}-will-on-destroy-not-on-end`] = () => will(v);
}
for (const v of Object.keys(VERSIONS)) {
    CHECKS[`ws-${v}-persistent-session-queues-qos1`] = () => persistent(v);
}

main(CHECKS, ['tcp', 'ws'], (args) => {
    TCP_URL = `mqtt://127.0.0.1:${requirePort(args, 'tcp')}`;
    WS_URL = `ws://127.0.0.1:${requirePort(args, 'ws')}/mqtt`;
});
