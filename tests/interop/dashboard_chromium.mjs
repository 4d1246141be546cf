#!/usr/bin/env node
// The live dashboard (GET / on a WebSocket listener) in a real headless
// Chromium: it loads without console errors, connects back over MQTT over
// WebSocket, shows the connection count the test drives, publishes and
// receives through its topic explorer, and asks for credentials on a broker
// that requires them. A screenshot is written for a human to look at.
//
//   node tests/interop/dashboard_chromium.mjs --ws WSPORT --tcp TCPPORT \
//        --auth-ws AUTHWSPORT --user USER --pass PASS --shot FILE.png [CHECK ...]
//
// --ws may be a reverse proxy's port (nginx-example.conf proxies / and /mqtt).
//
// The broker must publish $SYS every second (--sys-interval 1).

import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, Clients, WAIT_MS, fail, main, requirePort, sleep, waitFor } from './lib.mjs';

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
let WS, TCP, AUTH_WS, USER, PASS, SHOT;
let browser;

async function page(port) {
    const p = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors = [];
    p.on('console', (m) => {
        if (m.type() === 'error') errors.push(m.text());
    });
    p.on('pageerror', (e) => errors.push(String(e)));
    await p.goto(`http://127.0.0.1:${port}/`, { timeout: WAIT_MS });
    return { p, errors };
}

async function text(p, sel) {
    return (await p.textContent(sel)).trim();
}

async function waitText(p, sel, pred, what) {
    const deadline = Date.now() + WAIT_MS;
    let last;
    for (;;) {
        last = await text(p, sel);
        if (pred(last)) return last;
        if (Date.now() > deadline) fail(`${what}: ${sel} shows ${JSON.stringify(last)}`);
        await sleep(200);
    }
}

const checks = {
    'dashboard-live-connection-count-and-topic-explorer': async () => {
        const { p, errors } = await page(WS);
        await waitText(p, '#status', (t) => t === 'connected', 'status');
        // At least the page itself (the first $SYS publication may predate it).
        const before = Number(await waitText(p, '#connected', (t) => Number(t) >= 1, 'connected count'));
        const clients = new Clients();
        try {
            for (let i = 0; i < 5; i++) await clients.open(`dash${i}`, `mqtt://127.0.0.1:${TCP}`, { clientId: `dash-${i}` });
            await waitText(p, '#connected', (t) => Number(t) === before + 5, `${before + 5} clients connected`);
            // The topic explorer: subscribe, publish from the page and from
            // a client, see both; retained values are marked.
            const pub = clients.all[0].c;
            await new Promise((r) => pub.publish('dash/retained', 'kept', { retain: true, qos: 1 }, r));
            await p.fill('#filter', 'dash/#');
            await p.click('#subform button');
            await waitText(p, '#messages', (t) => t.includes('dash/retained') && t.includes('[retained]'), 'retained message');
            await p.fill('#ptopic', 'dash/from-page');
            await p.fill('#ppayload', 'hello from the browser');
            await p.click('#pubform button');
            await waitText(p, '#messages', (t) => t.includes('hello from the browser'), 'own publish');
            await new Promise((r) => pub.publish('dash/live', 'live value', { qos: 0 }, r));
            await waitText(p, '#messages', (t) => t.includes('live value'), 'live message');
            // Rates and shards get filled in from $SYS.
            await waitText(p, '#shards', (t) => t.length > 0, 'shard table');
            await sleep(2500); // a few chart points for the screenshot
            if (SHOT) await p.screenshot({ path: SHOT, fullPage: true });
            clients.closeAll();
            await waitText(p, '#connected', (t) => Number(t) === before, `back to ${before}`);
        } finally {
            clients.closeAll();
        }
        if (errors.length) fail(`console errors: ${errors.join(' | ')}`);
        await p.close();
    },
    'dashboard-asks-for-credentials-and-uses-them': async () => {
        const { p, errors } = await page(AUTH_WS);
        await waitText(p, '#status', (t) => t === 'login needed', 'status');
        if (!(await p.isVisible('#login'))) fail('no login form');
        await p.fill('#user', USER);
        await p.fill('#pass', 'wrong');
        await p.click('#loginform button');
        await waitText(p, '#status', (t) => t === 'login needed', 'refused again');
        await p.fill('#pass', PASS);
        await p.click('#loginform button');
        await waitText(p, '#status', (t) => t === 'connected', 'status after login');
        await waitText(p, '#connected', (t) => /^\d+$/.test(t), 'connected count');
        // The refused attempts log WebSocket closes in the console; only
        // script errors count here.
        const bad = errors.filter((e) => !/WebSocket/.test(e));
        if (bad.length) fail(`console errors: ${bad.join(' | ')}`);
        await p.close();
    },
};

browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
await main(
    checks,
    ['ws', 'tcp', 'auth-ws', 'user', 'pass', 'shot'],
    (args) => {
        WS = requirePort(args, 'ws');
        TCP = requirePort(args, 'tcp');
        AUTH_WS = args['auth-ws'] ? requirePort(args, 'auth-ws') : 0;
        USER = args.user;
        PASS = args.pass;
        SHOT = args.shot;
    },
    async () => {
        if (browser) await browser.close();
    },
);
