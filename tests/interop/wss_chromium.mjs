#!/usr/bin/env node
// MQTT over secure WebSocket from a real headless Chromium (Debian's
// chromium, driven by playwright-core), with MQTT.js's browser bundle in the
// page.
//
//   node tests/interop/wss_chromium.mjs --mqtts MQTTSPORT --wss WSSPORT --cafile CA.pem --spki BASE64 [CHECK ...]
//   node tests/interop/wss_chromium.mjs --list
//
// Against a Tarta on 127.0.0.1 started with --shards 2 and --mqtts/--wss
// listeners. Chromium trusts exactly the broker's key: it runs with
// --ignore-certificate-errors-spki-list=BASE64 (base64 of the SHA-256 of the
// server certificate's SubjectPublicKeyInfo), on top of the flags in lib.mjs;
// no blanket --ignore-certificate-errors. A local Node http server on
// 127.0.0.1 serves the page, which connects to wss://127.0.0.1:WSSPORT/mqtt
// while MQTT.js in Node (mqtts://, `ca` CA.pem) does the other side. Prints
// `ok - NAME` / `not ok - NAME: why` per check; exits 1 if any failed.
//
// Environment: CHROMIUM (default /usr/bin/chromium), INTEROP_WAIT.

import { readFileSync } from 'node:fs';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, Clients, WAIT_MS, expectMessages, fail, main, pickId, requirePort, sleep, withTimeout, servePage } from './lib.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

let MQTTS_URL;
let WSS_URL;
let CA;
let SPKI;

// Runs in the page: window.T drives MQTT.js.
const PAGE_JS = `
window.T = {
    msgs: [], client: null,
    connect(url, opts) {
        return new Promise((resolve, reject) => {
            const c = mqtt.connect(url, Object.assign({ reconnectPeriod: 0, keepalive: 30 }, opts));
            T.client = c;
            c.on('connect', () => resolve(true));
            c.on('error', (e) => reject('error: ' + e));
            c.on('close', () => reject('connection closed before CONNACK'));
            c.on('message', (topic, payload, packet) => {
                T.msgs.push({ topic, payload: payload.toString(), qos: packet.qos, retain: !!packet.retain });
            });
        });
    },
    async subscribe(filter, qos) {
        const granted = await T.client.subscribeAsync(filter, { qos });
        return granted.map((g) => g.qos);
    },
    async publishMany(topic, prefix, n, qos) {
        const all = [];
        for (let i = 0; i < n; i++) all.push(T.client.publishAsync(topic, prefix + i, { qos }));
        await Promise.all(all);
        return n;
    },
    count(topic) { return T.msgs.filter((m) => m.topic === topic).length; },
    end() { return new Promise((resolve) => T.client.end(false, {}, () => resolve(true))); },
};
`;

const PAGE_HTML = `<!doctype html>
<html><head><meta charset="utf-8"><title>tarta interop wss</title>
<script src="/mqtt.min.js"></script>
<script src="/page.js"></script>
</head><body><p>MQTT.js over secure WebSocket to Tarta</p></body></html>
`;

const startHttp = () => servePage(PAGE_HTML, PAGE_JS);

let httpServer = null;

// withBrowser(trustBroker, fn): a fresh Chromium (with the SPKI flag if
// trustBroker), a page from the local server, fn(page); always closed.
async function withBrowser(trustBroker, fn) {
    if (!httpServer) httpServer = await startHttp();
    const args = trustBroker ? [...CHROMIUM_ARGS, `--ignore-certificate-errors-spki-list=${SPKI}`] : CHROMIUM_ARGS;
    const browser = await withTimeout(
        chromium.launch({ executablePath: CHROMIUM, headless: true, args, timeout: WAIT_MS }),
        WAIT_MS + 5000,
        `Chromium (${CHROMIUM}) to start`,
    );
    try {
        const page = await browser.newPage();
        page.setDefaultTimeout(WAIT_MS);
        const logs = [];
        page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
        page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
        await page.goto(`http://127.0.0.1:${httpServer.address().port}/`, { timeout: WAIT_MS });
        const ready = await page.evaluate(() => typeof window.mqtt === 'object' && typeof window.T === 'object');
        if (!ready) fail(`page did not load MQTT.js: ${logs.join(' | ')}`);
        // ev(fn, arg, what): page.evaluate, bounded; the error names the page's log.
        page.ev = async (f, arg, what) => {
            try {
                return await withTimeout(page.evaluate(f, arg), WAIT_MS, `page: ${what}`);
            } catch (e) {
                fail(`${e.message.split('\n')[0]}${logs.length ? ` (page log: ${logs.slice(-3).join(' | ')})` : ''}`);
            }
        };
        return await fn(page);
    } finally {
        await withTimeout(browser.close(), 10000, 'Chromium to close').catch(() => {});
    }
}

// The premise: without the SPKI flag the page cannot connect (Chromium
// checks the certificate, which no CA it knows signed).
async function untrusted() {
    await withBrowser(false, async (page) => {
        const r = await page.ev(
            ([url, id]) => T.connect(url, { clientId: id, connectTimeout: 10000 }).then(() => 'connected', (e) => String(e)),
            [WSS_URL, pickId('cwu', 1)],
            'connect without the SPKI flag',
        );
        if (r === 'connected') fail('the page connected to the wss listener without trusting its certificate');
    });
}

// With the broker's key trusted: the page (shard 1) receives N QoS 1
// messages from MQTT.js over mqtts (shard 0) and publishes N that it
// receives: exact payloads, order, QoS.
async function roundTrip() {
    const n = 200;
    const cl = new Clients();
    try {
        await withBrowser(true, async (page) => {
            await page.ev(([url, id]) => T.connect(url, { clientId: id, protocolVersion: 5 }), [WSS_URL, pickId('cwb', 1)], 'CONNACK over wss');
            const node = await cl.open('mqtts client', MQTTS_URL, { clientId: pickId('cwt', 0), protocolVersion: 5, ca: CA });
            const granted = await page.ev(([t, q]) => T.subscribe(t, q), ['chromium/wss/to-browser', 1], 'SUBACK');
            if (JSON.stringify(granted) !== '[1]') fail(`browser SUBACK: expected [1], got ${JSON.stringify(granted)}`);
            await node.subscribe([['chromium/wss/from-browser', 1]]);
            const toBrowser = Array.from({ length: n }, (_, i) => `tb-${i}`);
            await node.publishAll('chromium/wss/to-browser', toBrowser, 1);
            await page.ev(([t, p, k, q]) => T.publishMany(t, p, k, q), ['chromium/wss/from-browser', 'fb-', n, 1], 'PUBACKs');
            await node.waitCount('chromium/wss/from-browser', n);
            const deadline = Date.now() + WAIT_MS;
            while ((await page.ev((t) => T.count(t), 'chromium/wss/to-browser', 'count')) < n) {
                if (Date.now() > deadline) fail(`the page received ${await page.ev((t) => T.count(t), 'chromium/wss/to-browser', 'count')} of ${n}`);
                await sleep(50);
            }
            await sleep(300); // duplicates, if any, would arrive now
            const m = (topic) => (payload) => ({ topic, payload, qos: 1, retain: false });
            expectMessages('page', await page.ev(() => T.msgs, null, 'messages'), toBrowser.map(m('chromium/wss/to-browser')));
            expectMessages(
                'mqtts client',
                node.received(),
                Array.from({ length: n }, (_, i) => `fb-${i}`).map(m('chromium/wss/from-browser')),
            );
            await page.ev(() => T.end(), null, 'DISCONNECT');
        });
    } finally {
        cl.closeAll();
    }
}

const CHECKS = {
    'wss-untrusted-certificate-refused-by-the-browser': untrusted,
    'wss-v5-qos1-round-trip-exact': roundTrip,
};

main(
    CHECKS,
    ['mqtts', 'wss', 'cafile', 'spki'],
    (args) => {
        MQTTS_URL = `mqtts://127.0.0.1:${requirePort(args, 'mqtts')}`;
        WSS_URL = `wss://127.0.0.1:${requirePort(args, 'wss')}/mqtt`;
        if (!args.cafile || !args.spki) {
            process.stderr.write('--cafile CA.pem and --spki BASE64 are required\n');
            process.exit(2);
        }
        CA = readFileSync(args.cafile);
        SPKI = args.spki;
    },
    async () => {
        if (httpServer) {
            httpServer.closeAllConnections?.();
            httpServer.close();
            httpServer = null;
        }
    },
);
