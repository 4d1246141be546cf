#!/usr/bin/env node
// MQTT over WebSocket from a real headless Chromium (Debian's chromium,
// driven by playwright-core), with MQTT.js's browser bundle in the page.
//
//   node tests/interop/ws_chromium.mjs --tcp TCPPORT --ws WSPORT [CHECK ...]
//   node tests/interop/ws_chromium.mjs --list
//
// A local Node http server on 127.0.0.1 serves a small page that loads
// node_modules/mqtt/dist/mqtt.min.js; the page connects to
// ws://127.0.0.1:WSPORT/mqtt while MQTT.js in Node does the other side over
// TCP. Prints `ok - NAME` / `not ok - NAME: why` per check and, for the
// throughput check, a line `chromium_msgs_per_s=N`; exits 1 if any failed.
//
// Environment: CHROMIUM (default /usr/bin/chromium), INTEROP_WAIT,
// BENCH_MESSAGES (default 200000), BENCH_WINDOW_S (default 2),
// BENCH_PAYLOAD (bytes, default 64), BENCH_RUNS (default 3).

import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, Clients, WAIT_MS, expectMessages, fail, main, pickId, requirePort, sleep, withTimeout, servePage } from './lib.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const BENCH_MESSAGES = Number(process.env.BENCH_MESSAGES || 200000);
const BENCH_WINDOW_MS = 1000 * Number(process.env.BENCH_WINDOW_S || 2);
const BENCH_PAYLOAD = Number(process.env.BENCH_PAYLOAD || 64);
const BENCH_RUNS = Number(process.env.BENCH_RUNS || 3);
const MQTTJS_VERSION = JSON.parse(readFileSync(path.join(HERE, 'node_modules/mqtt/package.json'), 'utf8')).version;

let TCP_PORT;
let WS_URL;
let TCP_URL;

// ------------------------------------------------------------ the page

// Runs in the page. window.T drives MQTT.js; the message handler does no
// DOM work: test messages go to an array, benchmark messages bump a counter.
const PAGE_JS = `
window.T = {
    msgs: [], errors: [], closed: false, client: null,
    benchTopic: null, benchN: 0, marks: [],
    connect(url, opts) {
        return new Promise((resolve, reject) => {
            const c = mqtt.connect(url, Object.assign({ reconnectPeriod: 0, keepalive: 30 }, opts));
            T.client = c;
            c.on('connect', (ack) => resolve({ sessionPresent: !!ack.sessionPresent }));
            c.on('error', (e) => { T.errors.push(String(e)); reject(String(e)); });
            c.on('close', () => { T.closed = true; reject('closed before CONNACK'); });
            c.on('message', (topic, payload, packet) => {
                if (topic === T.benchTopic) {
                    // A counter, and a timestamp every 1024 messages.
                    const n = ++T.benchN;
                    if (n === 1 || (n & 1023) === 0) T.marks.push([performance.now(), n]);
                    return;
                }
                if (topic.startsWith('chromium/bench/')) return; // an earlier run's stragglers
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
    // Benchmark: count messages on topic, with (time, count) marks.
    benchStart(topic) { T.benchTopic = topic; T.benchN = 0; T.marks = []; },
    benchStop() { T.benchTopic = null; return { n: T.benchN, marks: T.marks }; },
    end() { return new Promise((resolve) => T.client.end(false, {}, () => resolve(true))); },
};
`;

const PAGE_HTML = `<!doctype html>
<html><head><meta charset="utf-8"><title>tarta interop</title>
<script src="/mqtt.min.js"></script>
<script src="/page.js"></script>
</head><body><p>MQTT.js over WebSocket to Tarta</p></body></html>
`;

const startHttp = () => servePage(PAGE_HTML, PAGE_JS);

// ------------------------------------------------------------ browser

let httpServer = null;
let browser = null;

async function openPage() {
    if (!httpServer) httpServer = await startHttp();
    if (!browser) {
        browser = await withTimeout(
            chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: WAIT_MS }),
            WAIT_MS + 5000,
            `Chromium (${CHROMIUM}) to start`,
        );
    }
    const page = await browser.newPage();
    page.setDefaultTimeout(WAIT_MS);
    const logs = [];
    page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
    await page.goto(`http://127.0.0.1:${httpServer.address().port}/`, { timeout: WAIT_MS });
    const hasMqtt = await page.evaluate(() => typeof window.mqtt === 'object' && typeof window.T === 'object');
    if (!hasMqtt) fail(`page did not load MQTT.js: ${logs.join(' | ')}`);
    // ev(fn, arg, what): page.evaluate, bounded, failing with the page's log.
    page.ev = async (fn, arg, what) => {
        try {
            return await withTimeout(page.evaluate(fn, arg), WAIT_MS, `page: ${what}`);
        } catch (e) {
            fail(`${e.message.split('\n')[0]}${logs.length ? ` (page log: ${logs.slice(-3).join(' | ')})` : ''}`);
        }
    };
    return page;
}

async function closeBrowser() {
    if (browser) {
        const b = browser;
        browser = null;
        await withTimeout(b.close(), 10000, 'Chromium to close').catch(() => {});
    }
    if (httpServer) {
        httpServer.closeAllConnections?.();
        httpServer.close();
        httpServer = null;
    }
}

async function pageConnect(page, opts) {
    return page.ev(([url, o]) => T.connect(url, o), [WS_URL, opts], `CONNACK for ${opts.clientId}`);
}

// ------------------------------------------------------------ checks

// The page subscribes and receives N messages per QoS from a TCP publisher,
// and publishes N per QoS that a TCP subscriber receives: exact counts,
// payloads, order and QoS. Browser and TCP client on different shards.
async function roundTrip(v) {
    const pv = v === 'v5' ? 5 : 4;
    const plan = [
        [0, 500],
        [1, 500],
        [2, 200],
    ];
    const cl = new Clients();
    let page;
    try {
        page = await openPage();
        await pageConnect(page, { clientId: pickId(`cr${v}b`, 1), protocolVersion: pv });
        const tcp = await cl.open('tcp client', TCP_URL, { clientId: pickId(`cr${v}t`, 0), protocolVersion: pv });
        for (const [q] of plan) {
            const got = await page.ev(([t, qq]) => T.subscribe(t, qq), [`chromium/${v}/to-browser/q${q}`, q], 'SUBACK');
            if (JSON.stringify(got) !== JSON.stringify([q])) fail(`browser SUBACK: expected [${q}], got ${JSON.stringify(got)}`);
            await tcp.subscribe([[`chromium/${v}/from-browser/q${q}`, q]]);
        }
        // TCP -> browser
        const wantBrowser = [];
        for (const [q, n] of plan) {
            const topic = `chromium/${v}/to-browser/q${q}`;
            const payloads = Array.from({ length: n }, (_, i) => `tb-q${q}-${i}`);
            await tcp.publishAll(topic, payloads, q);
            wantBrowser.push(...payloads.map((payload) => ({ topic, payload, qos: q, retain: false })));
        }
        // browser -> TCP
        const wantTcp = [];
        for (const [q, n] of plan) {
            const topic = `chromium/${v}/from-browser/q${q}`;
            await page.ev(([t, p, nn, qq]) => T.publishMany(t, p, nn, qq), [topic, `fb-q${q}-`, n, q], `acks of ${n} QoS ${q} publications`);
            wantTcp.push(...Array.from({ length: n }, (_, i) => ({ topic, payload: `fb-q${q}-${i}`, qos: q, retain: false })));
        }
        const deadline = Date.now() + WAIT_MS;
        while ((await page.ev(() => T.msgs.length, null, 'count')) < wantBrowser.length && Date.now() < deadline) {
            await sleep(50);
        }
        await tcp.waitCount(undefined, wantTcp.length).catch(() => {});
        await sleep(500); // duplicates, if any, would arrive now
        const got = await page.ev(() => T.msgs, null, 'messages');
        // Per topic (per QoS) order is what MQTT promises; compare per topic.
        for (const [q] of plan) {
            const t = `chromium/${v}/to-browser/q${q}`;
            expectMessages(`browser (QoS ${q})`, got.filter((m) => m.topic === t), wantBrowser.filter((m) => m.topic === t));
            const u = `chromium/${v}/from-browser/q${q}`;
            expectMessages(`tcp subscriber (QoS ${q})`, tcp.received(u), wantTcp.filter((m) => m.topic === u));
        }
        if (got.length !== wantBrowser.length) fail(`browser got ${got.length} messages in all, expected ${wantBrowser.length}`);
        await page.ev(() => T.end(), null, 'DISCONNECT');
    } finally {
        cl.closeAll();
        if (page) await page.close().catch(() => {});
    }
}

// A raw MQTT 3.1.1 TCP publisher: CONNECT, then pre-encoded QoS 0 PUBLISH
// packets written as fast as the socket takes them (waiting for 'drain').
function rawPublisher(clientId) {
    return new Promise((resolve, reject) => {
        const sock = net.connect(TCP_PORT, '127.0.0.1');
        const id = Buffer.from(clientId);
        const body = Buffer.concat([
            Buffer.from([0, 4, 0x4d, 0x51, 0x54, 0x54, 4, 0x02, 0, 60, id.length >> 8, id.length & 0xff]),
            id,
        ]);
        sock.once('error', reject);
        sock.once('connect', () => sock.write(Buffer.concat([Buffer.from([0x10, body.length]), body])));
        sock.once('data', (d) => {
            if (d.length < 4 || d[0] !== 0x20 || d[3] !== 0) reject(new Error(`bad CONNACK ${d.toString('hex')}`));
            else resolve(sock);
        });
    });
}

function encodePublish(topic, payload) {
    const t = Buffer.from(topic);
    const rem = 2 + t.length + payload.length;
    const len = [];
    let x = rem;
    do {
        let b = x % 128;
        x = Math.floor(x / 128);
        if (x > 0) b |= 0x80;
        len.push(b);
    } while (x > 0);
    return Buffer.concat([Buffer.from([0x30, ...len, t.length >> 8, t.length & 0xff]), t, payload]);
}

async function sendAll(sock, packet, n, stop) {
    const per = 1000;
    const batch = Buffer.concat(Array(per).fill(packet));
    let sent = 0;
    while (sent < n && !stop()) {
        const k = Math.min(per, n - sent);
        const ok = sock.write(k === per ? batch : batch.subarray(0, k * packet.length));
        sent += k;
        if (!ok) {
            await withTimeout(new Promise((r) => sock.once('drain', r)), WAIT_MS, 'the publisher socket to drain');
        }
    }
    return sent;
}

// QoS 0 messages per second one tab receives while a raw TCP publisher sends
// BENCH_MESSAGES BENCH_PAYLOAD-byte messages as fast as the broker reads
// them. Counted in the page (a counter, no DOM work; a performance.now()
// mark every 1024 messages), over a fixed window of BENCH_WINDOW_S seconds
// from the first message (cut short if the stream stops sooner). Repeated
// BENCH_RUNS times with a new publisher each time; the median is printed.
async function benchRun(page, run) {
    const topic = `chromium/bench/${run}`;
    await page.ev((t) => T.benchStart(t), topic, 'benchmark start');
    const sock = await withTimeout(rawPublisher(pickId(`crbp${run}`, 0)), WAIT_MS, 'publisher CONNACK');
    try {
        const packet = encodePublish(topic, Buffer.alloc(BENCH_PAYLOAD, 0x61));
        const t0 = Date.now();
        const sent = await sendAll(sock, packet, BENCH_MESSAGES, () => false);
        const sendMs = Date.now() - t0;
        // Wait until the page stops receiving (no progress for 1 s), bounded.
        let last = -1;
        let still = 0;
        const deadline = Date.now() + WAIT_MS;
        while (Date.now() < deadline) {
            await sleep(250);
            const n = await page.ev(() => T.benchN, null, 'count');
            if (n >= sent) break;
            if (n === last) {
                if (++still >= 4) break;
            } else {
                still = 0;
            }
            last = n;
        }
        const r = await page.ev(() => T.benchStop(), null, 'benchmark stop');
        const m = r.marks;
        if (process.env.BENCH_DUMP) {
            console.log(`# marks ${JSON.stringify(m.map(([t, n]) => [Math.round(t - m[0][0]), n]))}`);
        }
        if (m.length < 10) fail(`run ${run}: too few messages to measure: the page received ${r.n} of ${sent}`);
        let b = 0;
        while (b + 1 < m.length && m[b + 1][0] <= m[0][0] + BENCH_WINDOW_MS) b++;
        const dt = (m[b][0] - m[0][0]) / 1000;
        const rate = Math.round((m[b][1] - m[0][1]) / dt);
        console.log(
            `# run ${run}: sent ${sent} x ${packet.length}-byte PUBLISH in ${sendMs} ms; ` +
                `page received ${r.n} (${((100 * r.n) / sent).toFixed(1)}%); ${m[b][1] - m[0][1]} in ${dt.toFixed(2)} s: ${rate}/s`,
        );
        return rate;
    } finally {
        sock.destroy();
    }
}

async function throughput() {
    let page;
    try {
        page = await openPage();
        await pageConnect(page, { clientId: pickId('crbench', 1), protocolVersion: 4 });
        // One topic per run: messages of a run still arriving after it are not counted.
        const g = await page.ev((t) => T.subscribe(t, 0), 'chromium/bench/+', 'SUBACK');
        if (JSON.stringify(g) !== '[0]') fail(`SUBACK ${JSON.stringify(g)}`);
        const rates = [];
        for (let run = 1; run <= BENCH_RUNS; run++) rates.push(await benchRun(page, run));
        rates.sort((x, y) => x - y);
        const median = rates[Math.floor(rates.length / 2)];
        console.log(`# chromium ${browser.version()}, MQTT.js ${MQTTJS_VERSION}: median of ${rates.length} runs (${rates.join(', ')})`);
        console.log(`chromium_msgs_per_s=${median}`);
        await page.ev(() => T.end(), null, 'DISCONNECT');
    } finally {
        if (page) await page.close().catch(() => {});
    }
}

const CHECKS = {
    'ws-v311-round-trip-exact': () => roundTrip('v311'),
    'ws-v5-round-trip-exact': () => roundTrip('v5'),
    'ws-qos0-throughput': throughput,
};

main(
    CHECKS,
    ['tcp', 'ws'],
    (args) => {
        TCP_PORT = requirePort(args, 'tcp');
        TCP_URL = `mqtt://127.0.0.1:${TCP_PORT}`;
        WS_URL = `ws://127.0.0.1:${requirePort(args, 'ws')}/mqtt`;
    },
    closeBrowser,
);
