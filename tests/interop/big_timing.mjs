// Times the delivery of one 1 MiB QoS 1 message: publish -> subscriber's
// message event, for each combination of TCP and WebSocket (MQTT.js).
import mqtt from 'mqtt';
const [tcp, ws, rounds = '5'] = process.argv.slice(2);
const url = (w) => w ? `ws://127.0.0.1:${ws}/mqtt` : `mqtt://127.0.0.1:${tcp}`;
const once = (c, ev) => new Promise((r) => c.once(ev, r));
const payload = Buffer.alloc(1 << 20, 7);
for (const [subWs, pubWs] of [[false, false], [true, false], [false, true], [true, true]]) {
  const sub = mqtt.connect(url(subWs), { clientId: `bigsub-${subWs}${pubWs}` });
  const pub = mqtt.connect(url(pubWs), { clientId: `bigpub-${subWs}${pubWs}` });
  await Promise.all([once(sub, 'connect'), once(pub, 'connect')]);
  await sub.subscribeAsync('big', { qos: 1 });
  const times = [];
  for (let i = 0; i < Number(rounds); i++) {
    const got = once(sub, 'message');
    const t0 = process.hrtime.bigint();
    pub.publish('big', payload, { qos: 1 });
    await got;
    times.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  times.sort((a, b) => a - b);
  console.log(`sub=${subWs ? 'ws' : 'tcp'} pub=${pubWs ? 'ws' : 'tcp'} median_ms=${times[times.length >> 1].toFixed(1)}`);
  await Promise.all([sub.endAsync(), pub.endAsync()]);
}
process.exit(0);
