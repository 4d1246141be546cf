#!/usr/bin/env node
// MQTT.js over WebSocket through an nginx reverse proxy in front of Tarta.
//
//   node tests/interop/ws_nginx.mjs --proxy NGINXPORT --tcp TCPPORT --log BROKER_STDERR [CHECK ...]
//   node tests/interop/ws_nginx.mjs --list
//
// Expects (run.sh sets this up): nginx on 127.0.0.1:NGINXPORT proxying
// /mqtt to a Tarta whose config has ws_trusted_proxies = ["127.0.0.1"],
// started with --shards 2 --log debug and stderr written to BROKER_STDERR;
// the same Tarta's MQTT/TCP port is TCPPORT. Prints `ok - NAME` /
// `not ok - NAME: why` per check; exits 1 if any failed.

import { readFileSync, statSync } from 'node:fs';
import { Clients, expectMessages, fail, main, pickId, requirePort, sleep, waitFor } from './lib.mjs';

let PROXY_URL;
let TCP_URL;
let LOG;

// The client-supplied X-Forwarded-For; nginx appends its own peer
// ($proxy_add_x_forwarded_for), so Tarta sees "198.51.100.7, 127.0.0.1".
const CLIENT_XFF = '198.51.100.7';
// A forged header from a client that is not a trusted proxy.
const FORGED_XFF = '198.51.100.99';

function escapeRe(s) {
    return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

const logSize = () => statSync(LOG).size;

// The `closing connection shard=N peer=IP:0 client_id=ID` debug line Tarta
// writes when the connection of client ID closes, past byte `from` of the
// log; returns IP.
function closedPeer(id, from) {
    const re = new RegExp(`closing connection shard=\\d+ peer=(\\S+):\\d+ client_id=${escapeRe(id)}(\\s|$)`, 'm');
    const m = readFileSync(LOG).subarray(from).toString('utf8').match(re);
    return m ? m[1] : null;
}

async function waitClosedPeer(id, from) {
    try {
        await waitFor(() => closedPeer(id, from) !== null, `the broker's "closing connection ... client_id=${id}" log line`);
    } catch (e) {
        fail(`${e.message} (is tarta running with --log debug, stderr to ${LOG}?)`);
    }
    return closedPeer(id, from);
}

// QoS 1 both ways between MQTT.js over ws through nginx (shard 1) and a
// direct TCP client (shard 0); after the ws client disconnects, the broker's
// log names the address from X-Forwarded-For, not nginx's 127.0.0.1.
async function roundTripAndForwardedFor() {
    const n = 50;
    const id = pickId('ngxw', 1);
    const from = logSize();
    const cl = new Clients();
    try {
        const ws = await cl.open('ws client via nginx', PROXY_URL, {
            clientId: id,
            protocolVersion: 4,
            wsOptions: { headers: { 'X-Forwarded-For': CLIENT_XFF } },
        });
        const tcp = await cl.open('direct tcp client', TCP_URL, { clientId: pickId('ngxt', 0), protocolVersion: 5 });
        await ws.subscribe([['nginx/to-ws', 1]]);
        await tcp.subscribe([['nginx/from-ws', 1]]);
        const p1 = Array.from({ length: n }, (_, i) => `to-ws-${i}`);
        const p2 = Array.from({ length: n }, (_, i) => `from-ws-${i}`);
        await tcp.publishAll('nginx/to-ws', p1, 1);
        await ws.publishAll('nginx/from-ws', p2, 1);
        await ws.waitCount('nginx/to-ws', n);
        await tcp.waitCount('nginx/from-ws', n);
        await sleep(300);
        const m = (topic) => (payload) => ({ topic, payload, qos: 1, retain: false });
        expectMessages('ws client via nginx', ws.received(), p1.map(m('nginx/to-ws')));
        expectMessages('direct tcp client', tcp.received(), p2.map(m('nginx/from-ws')));
        await ws.end();
        const peer = await waitClosedPeer(id, from);
        if (peer !== CLIENT_XFF) {
            fail(`broker logged peer ${peer} for ${id}, expected ${CLIENT_XFF} (X-Forwarded-For "${CLIENT_XFF}, 127.0.0.1" from trusted proxy 127.0.0.1)`);
        }
    } finally {
        cl.closeAll();
    }
}

// A client at 127.0.0.2 (not a trusted proxy) forges X-Forwarded-For; nginx
// appends 127.0.0.2, and Tarta, walking the list from the right and skipping
// only trusted proxies, must log 127.0.0.2, not the forged address.
async function forgedForwardedFor() {
    const id = pickId('ngxf', 1);
    const from = logSize();
    const cl = new Clients();
    try {
        const ws = await cl.open('ws client from 127.0.0.2 via nginx', PROXY_URL, {
            clientId: id,
            protocolVersion: 5,
            wsOptions: { localAddress: '127.0.0.2', headers: { 'X-Forwarded-For': FORGED_XFF } },
        });
        await ws.subscribe([['nginx/forged', 1]]);
        await ws.publishAll('nginx/forged', ['self'], 1);
        await ws.waitCount('nginx/forged', 1);
        await ws.end();
        const peer = await waitClosedPeer(id, from);
        if (peer !== '127.0.0.2') {
            fail(`broker logged peer ${peer} for ${id}, expected 127.0.0.2 (X-Forwarded-For "${FORGED_XFF}, 127.0.0.2" from trusted proxy 127.0.0.1; 127.0.0.2 is not trusted)`);
        }
    } finally {
        cl.closeAll();
    }
}

// nginx passes GET /health through (plain HTTP, no upgrade).
async function health() {
    const url = PROXY_URL.replace(/^ws:/, 'http:').replace(/\/mqtt$/, '/health');
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 10000);
    try {
        const r = await fetch(url, { signal: ctl.signal });
        const body = await r.text();
        if (r.status !== 200 || body.trim() !== 'ok') fail(`GET ${url}: ${r.status} ${JSON.stringify(body)}`);
    } finally {
        clearTimeout(timer);
    }
}

const CHECKS = {
    'ws-qos1-round-trip-and-x-forwarded-for-logged': roundTripAndForwardedFor,
    'forged-x-forwarded-for-from-untrusted-client-ignored': forgedForwardedFor,
    'health-passthrough': health,
};

main(CHECKS, ['proxy', 'tcp', 'log'], (args) => {
    PROXY_URL = `ws://127.0.0.1:${requirePort(args, 'proxy')}/mqtt`;
    TCP_URL = `mqtt://127.0.0.1:${requirePort(args, 'tcp')}`;
    if (!args.log) {
        process.stderr.write('--log BROKER_STDERR is required\n');
        process.exit(2);
    }
    LOG = args.log;
});
