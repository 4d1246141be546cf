// Shared helpers for the Node.js interop checks (ws_mqttjs.mjs,
// ws_chromium.mjs, ws_nginx.mjs, tls_mqttjs.mjs, wss_chromium.mjs): argument
// parsing, Tarta's home-shard hash, MQTT.js clients with bounded waits,
// Chromium's flags, and the `ok - NAME` / `not ok - NAME: why` check runner.

import { readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import mqtt from 'mqtt';

// Bound on every single wait (CONNACK, SUBACK, acks, deliveries), seconds.
export const WAIT_MS = 1000 * Number(process.env.INTEROP_WAIT || 30);
// Bound on a whole check, seconds.
export const CHECK_BUDGET_MS = 1000 * Number(process.env.INTEROP_CHECK_BUDGET || 120);
export const SHARDS = 2;
export const HOST = '127.0.0.1';
// Chromium's flags (ws_chromium.mjs, wss_chromium.mjs): no network but
// loopback, no background noise.
export const CHROMIUM_ARGS = [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--disable-background-networking',
    '--disable-component-update',
    '--no-first-run',
    '--disable-sync',
    '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost',
];

export class CheckFailed extends Error {}

export function fail(why) {
    throw new CheckFailed(why);
}

// parseArgs(argv, names): `--name VALUE` options into an object, the rest
// (check names) into `rest`; `--list` sets `list`.
export function parseArgs(argv, names) {
    const out = { rest: [], list: false };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === '--list') {
            out.list = true;
        } else if (a.startsWith('--')) {
            const name = a.slice(2);
            if (!names.includes(name) || i + 1 >= argv.length) {
                usage(`unknown option or missing value: ${a}`);
            }
            out[name] = argv[++i];
        } else {
            out.rest.push(a);
        }
    }
    return out;
}

function usage(why) {
    process.stderr.write(`${why}\n`);
    process.exit(2);
}

export function requirePort(args, name) {
    const p = Number(args[name]);
    if (!Number.isInteger(p) || p <= 0 || p > 65535) usage(`--${name} PORT is required`);
    return p;
}

// Tarta's home shard of a client id: FNV-1a-64(id bytes) % shards.
export function homeShard(id, shards = SHARDS) {
    let h = 0xcbf29ce484222325n;
    for (const b of Buffer.from(id)) {
        h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
    }
    return Number(h % BigInt(shards));
}

// The first `PREFIX-K` homed on `shard` (keep PREFIX short: 3.1 allows 23 chars).
export function pickId(prefix, shard) {
    for (let k = 0; ; k++) {
        const id = `${prefix}-${k}`;
        if (homeShard(id) === shard) return id;
    }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// withTimeout(promise, ms, what): the promise's value, or CheckFailed after ms.
export function withTimeout(promise, ms, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new CheckFailed(`timed out after ${Math.round(ms / 1000)}s waiting for ${what}`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// waitFor(pred, what, ms): polls pred every 10 ms until true; CheckFailed after ms.
export async function waitFor(pred, what, ms = WAIT_MS) {
    const deadline = Date.now() + ms;
    while (!pred()) {
        if (Date.now() >= deadline) fail(`timed out after ${Math.round(ms / 1000)}s waiting for ${what}`);
        await sleep(10);
    }
}

// An MQTT.js client that records what it receives.
export class Client {
    constructor(name, url, opts) {
        this.name = name;
        this.msgs = []; // {topic, payload (string), qos, retain}
        this.connack = null;
        this.closed = false;
        this.errors = [];
        this.c = mqtt.connect(url, {
            reconnectPeriod: 0, // a lost connection stays lost
            connectTimeout: WAIT_MS,
            keepalive: 30,
            ...opts,
        });
        this.c.on('message', (topic, payload, packet) => {
            this.msgs.push({ topic, payload: payload.toString(), qos: packet.qos, retain: !!packet.retain });
        });
        this.c.on('connect', (connack) => {
            this.connack = connack;
        });
        this.c.on('error', (e) => this.errors.push(e));
        this.c.on('close', () => {
            this.closed = true;
        });
    }

    async connected() {
        await waitFor(() => this.connack || this.closed || this.errors.length, `${this.name}: CONNACK`);
        if (!this.connack) {
            fail(`${this.name}: no CONNACK: ${this.errors.map(String).join('; ') || 'connection closed'}`);
        }
        return this;
    }

    // subscribe([[filter, qos], ...]): one SUBSCRIBE; fails unless granted as asked.
    async subscribe(filters, opts = {}) {
        const map = Object.fromEntries(filters.map(([f, q]) => [f, { qos: q, ...opts }]));
        const granted = await withTimeout(this.c.subscribeAsync(map), WAIT_MS, `${this.name}: SUBACK`);
        const got = granted.map((g) => g.qos);
        const want = filters.map(([, q]) => q);
        if (JSON.stringify(got) !== JSON.stringify(want)) {
            fail(`${this.name}: SUBACK for ${filters.map(([f]) => f)}: expected ${want}, got ${got}`);
        }
    }

    // publishAll(topic, payloads, qos, opts): publishes them in order, then
    // waits until every one is sent (QoS 0) or acknowledged (QoS 1/2).
    async publishAll(topic, payloads, qos, opts = {}) {
        const done = payloads.map((p) => this.c.publishAsync(topic, p, { qos, ...opts }));
        await withTimeout(
            Promise.all(done),
            WAIT_MS,
            `${this.name}: acknowledgements of ${payloads.length} QoS ${qos} publications to ${topic}`,
        );
    }

    received(topic) {
        return this.msgs.filter((m) => topic === undefined || m.topic === topic);
    }

    async waitCount(topic, n) {
        try {
            await waitFor(() => this.received(topic).length >= n, `${this.name}: ${n} messages on ${topic}`);
        } catch (e) {
            fail(`${e.message} (got ${this.received(topic).length})`);
        }
    }

    // end(): clean DISCONNECT, bounded.
    async end() {
        if (this.closed) return;
        await withTimeout(this.c.endAsync(), WAIT_MS, `${this.name}: DISCONNECT`).catch(() => this.c.end(true));
    }

    kill() {
        try {
            this.c.end(true);
        } catch {
            // already gone
        }
    }
}

// Compares the received messages with the expected ones, exactly.
export function expectMessages(name, got, want) {
    const fmt = (m) => `${m.topic} q${m.qos} r${m.retain ? 1 : 0} ${JSON.stringify(m.payload)}`;
    if (got.length !== want.length) {
        const extra = got.length > want.length ? `; first extra: ${fmt(got[want.length])}` : '';
        fail(`${name}: expected ${want.length} messages, got ${got.length}${extra}`);
    }
    for (let i = 0; i < want.length; i++) {
        if (fmt(got[i]) !== fmt(want[i])) {
            fail(`${name}: message ${i}: expected ${fmt(want[i])}, got ${fmt(got[i])}`);
        }
    }
}

// A set of clients closed whatever happens.
export class Clients {
    constructor() {
        this.all = [];
    }

    async open(name, url, opts) {
        const c = new Client(name, url, opts);
        this.all.push(c);
        return c.connected();
    }

    closeAll() {
        for (const c of this.all) c.kill();
        this.all = [];
    }
}

// runChecks(checks, selected): runs each named check (all by default) under
// CHECK_BUDGET_MS, prints `ok - NAME` / `not ok - NAME: why`, returns the
// number of failures.
export async function runChecks(checks, selected) {
    const names = selected.length ? selected : Object.keys(checks);
    const unknown = names.filter((n) => !(n in checks));
    if (unknown.length) usage(`unknown checks: ${unknown.join(', ')}`);
    let failed = 0;
    for (const name of names) {
        try {
            await withTimeout(checks[name](), CHECK_BUDGET_MS, `the whole check`);
            console.log(`ok - ${name}`);
        } catch (e) {
            failed++;
            let why = e instanceof CheckFailed ? e.message : `${e && e.name}: ${e && e.message}`;
            why = why.replace(/\s+/g, ' ');
            if (why.length > 400) why = `${why.slice(0, 400)}...`;
            console.log(`not ok - ${name}: ${why}`);
        }
    }
    return failed;
}

// main(checks, optionNames, setup, teardown): the common command line, the
// checks, teardown (bounded), then exit. A watchdog ends the process if
// everything together takes far too long.
export async function main(checks, optionNames, setup, teardown = async () => {}) {
    const args = parseArgs(process.argv.slice(2), optionNames);
    if (args.list) {
        console.log(Object.keys(checks).join('\n'));
        process.exit(0);
    }
    setup(args);
    const names = args.rest.length ? args.rest : Object.keys(checks);
    const watchdog = setTimeout(() => {
        console.log(`not ok - watchdog: ${process.argv[1]} still running after ${names.length} x ${CHECK_BUDGET_MS / 1000}s`);
        process.exit(1);
    }, names.length * CHECK_BUDGET_MS + 10000);
    watchdog.unref();
    let failed = 1;
    try {
        failed = await runChecks(checks, args.rest);
    } finally {
        await withTimeout(teardown(), 15000, 'teardown').catch((e) => console.log(`# teardown: ${e.message}`));
    }
    process.exit(failed ? 1 : 0);
}

// servePage(html, js): an HTTP server on 127.0.0.1 (a free port) serving the
// test page at /, its script at /page.js and the MQTT.js browser bundle at
// /mqtt.min.js. Resolves to the listening server.
export function servePage(html, js) {
    const here = path.dirname(fileURLToPath(import.meta.url));
    const bundle = readFileSync(path.join(here, 'node_modules/mqtt/dist/mqtt.min.js'));
    const server = http.createServer((req, res) => {
        const send = (type, body) => {
            res.writeHead(200, { 'Content-Type': type, 'Cache-Control': 'no-store' });
            res.end(body);
        };
        if (req.url === '/') send('text/html; charset=utf-8', html);
        else if (req.url === '/mqtt.min.js') send('text/javascript', bundle);
        else if (req.url === '/page.js') send('text/javascript', js);
        else {
            res.writeHead(404);
            res.end();
        }
    });
    return new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(0, '127.0.0.1', () => resolve(server));
    });
}
