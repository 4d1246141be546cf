#!/usr/bin/env node
// MQTT over TLS interop checks with MQTT.js in Node.js: mqtts:// and wss://.
//
//   node tests/interop/tls_mqttjs.mjs --mqtts MQTTSPORT --wss WSSPORT --cafile CA.pem [CHECK ...]
//   node tests/interop/tls_mqttjs.mjs --list
//
// Against a Tarta on 127.0.0.1 started with --shards 2 and --mqtts/--wss
// listeners whose certificate CA.pem verifies (for 127.0.0.1): MQTT.js with
// `ca` set (and rejectUnauthorized, the default) on
// mqtts://127.0.0.1:MQTTSPORT and wss://127.0.0.1:WSSPORT/mqtt, publisher and
// subscriber homed on different shards. Prints `ok - NAME` / `not ok - NAME:
// why` per check; exits 1 if any failed. Every wait is bounded (INTEROP_WAIT).

import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { Clients, expectMessages, fail, main, pickId, requirePort, sleep, waitFor } from './lib.mjs';

let MQTTS_URL;
let WSS_URL;
let CA;

// N QoS 1 messages from a publisher (shard 0) to a subscriber (shard 1), both
// on `url`: exact payloads, order, QoS, retain 0. Over mqtts, both
// connections must have negotiated the ALPN protocol `mqtt`.
async function roundTrip(kind, pv, n = 100) {
    const url = kind === 'mqtts' ? MQTTS_URL : WSS_URL;
    const topic = `mqttjs/tls/${kind}`;
    const tag = `jt${kind === 'mqtts' ? 'm' : 'w'}`;
    const tls = kind === 'mqtts' ? { ca: CA, ALPNProtocols: ['mqtt'] } : { ca: CA };
    const cl = new Clients();
    try {
        const sub = await cl.open(`${kind} subscriber`, url, { clientId: pickId(`${tag}s`, 1), protocolVersion: pv, ...tls });
        const pub = await cl.open(`${kind} publisher`, url, { clientId: pickId(`${tag}p`, 0), protocolVersion: pv, ...tls });
        if (kind === 'mqtts') {
            for (const c of [sub, pub]) {
                if (c.c.stream.alpnProtocol !== 'mqtt') {
                    fail(`${c.name}: negotiated ALPN ${JSON.stringify(c.c.stream.alpnProtocol)}, expected "mqtt"`);
                }
            }
        }
        await sub.subscribe([[topic, 1]]);
        const payloads = Array.from({ length: n }, (_, i) => `${tag}-${i}`);
        await pub.publishAll(topic, payloads, 1);
        await sub.waitCount(topic, n);
        await sleep(300); // duplicates, if any, would arrive now
        expectMessages(
            'subscriber',
            sub.received(),
            payloads.map((payload) => ({ topic, payload, qos: 1, retain: false })),
        );
    } finally {
        cl.closeAll();
    }
}

// A 1 MiB payload of random bytes, QoS 1, wss to wss (publisher shard 0,
// subscriber shard 1): arrives once, byte for byte (sha256).
async function big() {
    const topic = 'mqttjs/tls/big';
    const payload = randomBytes(1 << 20);
    const want = createHash('sha256').update(payload).digest('hex');
    const cl = new Clients();
    try {
        const sub = await cl.open('wss subscriber', WSS_URL, { clientId: pickId('jtbs', 1), protocolVersion: 5, ca: CA });
        const pub = await cl.open('wss publisher', WSS_URL, { clientId: pickId('jtbp', 0), protocolVersion: 5, ca: CA });
        const got = [];
        sub.c.on('message', (t, p) => {
            if (t === topic) got.push(Buffer.from(p));
        });
        await sub.subscribe([[topic, 1]]);
        await pub.publishAll(topic, [payload], 1);
        await waitFor(() => got.length >= 1, 'the 1 MiB message');
        await sleep(300);
        if (got.length !== 1) fail(`expected 1 message, got ${got.length}`);
        const sum = createHash('sha256').update(got[0]).digest('hex');
        if (got[0].length !== payload.length || sum !== want) {
            fail(`received ${got[0].length} bytes, sha256 ${sum.slice(0, 16)}...; sent ${payload.length}, ${want.slice(0, 16)}...`);
        }
    } finally {
        cl.closeAll();
    }
}

const CHECKS = {
    'mqtts-v311-qos1-cross-shard-alpn-mqtt': () => roundTrip('mqtts', 4),
    'wss-v5-qos1-cross-shard': () => roundTrip('wss', 5),
    'wss-1mib-message-intact': big,
};

main(CHECKS, ['mqtts', 'wss', 'cafile'], (args) => {
    MQTTS_URL = `mqtts://127.0.0.1:${requirePort(args, 'mqtts')}`;
    WSS_URL = `wss://127.0.0.1:${requirePort(args, 'wss')}/mqtt`;
    if (!args.cafile) {
        process.stderr.write('--cafile CA.pem is required\n');
        process.exit(2);
    }
    CA = readFileSync(args.cafile);
});
