// The rolling-restart drill: three nodes behind HAProxy with deploy/'s
// config, a private Redis, 300 official clients on their default transports
// (polling, then websocket) and a steady stream of notifications of all
// three variants through the balancer. Each node is restarted in turn with
// SIGTERM, then one is SIGKILLed. Every client must end with every
// notification that targeted it, exactly once, in order.
// DRILL_ENV='{"CHANNELS_RECOVERY_WINDOW":"0"}' (JSON) adds to the nodes'
// environment: with recovery off, the same drill loses notifications.
import assert from "node:assert/strict";
import { after, test } from "node:test";
import { io } from "socket.io-client";
import { API_KEY, startHaproxy, startNode, startRedis, wsToken } from "./helpers.mjs";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(check, ms, what) {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what} not met in ${ms} ms`);
    await sleep(50);
  }
}

// DRILL_USERS (100 by default) users, each once in each of three channels.
const USERS = Number(process.env.DRILL_USERS ?? 100);
const CHANNELS = 3;
// All clients come through the balancer's one address: no per-address
// connect limit (a deployment would set CHANNELS_CLIENT_ADDRESS_HEADER).
const NODE_ENV = { CHANNELS_CONNECT_RATE: "off", CHANNELS_AUTHORIZE_RATE: "off", ...JSON.parse(process.env.DRILL_ENV ?? "{}") };

let redis;
let lb;
const nodes = [];
const clients = [];
after(async () => {
  for (const socket of clients) socket.close();
  await lb?.stop();
  for (const node of nodes) await node.stop();
  await redis?.stop();
});

const ready = (node) => async () => {
  try {
    return (await fetch(`${node.url}/readyz`)).status === 200;
  } catch {
    return false;
  }
};

/** A frontend: a ws token from /authorize, then the official client. */
async function client(user, channel) {
  // The balancer may not yet send every call to a ready node: retried.
  let token;
  for (let attempt = 1; !token; attempt++) {
    token = await wsToken(lb, user).catch((e) => {
      if (attempt === 5) throw e;
    });
    if (!token) await sleep(200);
  }
  const socket = io(lb.url, {
    auth: { token, keycloakID: user, channel },
    withCredentials: true, // the balancer's stickiness cookie
    reconnectionDelay: 100,
    reconnectionDelayMax: 1000,
    forceNew: true,
  });
  socket.received = [];
  socket.connects = 0;
  // How each arrived (offset, connection, transport): a failure shows it.
  socket.arrivals = [];
  socket.on("notification", (msg, offset) => {
    socket.received.push(msg);
    socket.arrivals.push(`${msg} at ${offset} on connection ${socket.connects} (${socket.io.engine?.transport?.name})`);
  });
  socket.on("connect", () => {
    socket.connects++;
    if (socket.recovered) socket.recoveries++;
  });
  socket.recoveries = 0;
  socket.user = user;
  socket.channel = channel;
  // A refusal fails the drill; a transport error the client retries itself.
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${user}/${channel} not connected in 10 s`)), 10_000);
    socket.once("connect", () => {
      clearTimeout(timer);
      resolve();
    });
    socket.on("connect_error", (err) => {
      if (["unauthorized", "bad_request", "too_many_sockets"].includes(err.message)) {
        clearTimeout(timer);
        reject(err);
      }
    });
  });
  return socket;
}

/**
 * Posts notifications one after another through the balancer until
 * `stop.now`, each retried with its Idempotency-Key until it is answered
 * 200 (a node going away may drop a call): what it returns is every
 * notification answered, in the order answered.
 */
async function poster(stop) {
  const sent = [];
  for (let n = 0; !stop.now; n++) {
    const user = `u${n % USERS}`;
    const channel = `c${n % CHANNELS}`;
    const target = [{ channel }, { keycloak: user }, { keycloak: user, channel }][n % 3];
    const msg = `m${n}`;
    const body = JSON.stringify({ API_KEY, msg, ...target });
    const deadline = Date.now() + 15_000;
    for (;;) {
      try {
        const response = await fetch(`${lb.url}/notify`, {
          method: "POST",
          headers: { "content-type": "application/json", "idempotency-key": `drill-${n}` },
          body,
        });
        await response.arrayBuffer();
        if (response.status === 200) break;
      } catch {
        // The connection went with its node: the same call again.
      }
      if (Date.now() > deadline) throw new Error(`notification ${n} not accepted in 15 s`);
      await sleep(20);
    }
    sent.push({ msg, ...target });
    await sleep(5);
  }
  return sent;
}

/** How a client's repeated notifications arrived, for a failure's message. */
function arrivals(socket) {
  const seen = new Map();
  for (const [k, msg] of socket.received.entries()) seen.set(msg, [...(seen.get(msg) ?? []), k]);
  const repeated = [...seen.values()].filter((ks) => ks.length > 1);
  return repeated.map((ks) => ks.map((k) => socket.arrivals[k]).join(", then ")).join("; ") || "nothing twice";
}

const targets = (socket, { channel, keycloak }) =>
  (channel === undefined || channel === socket.channel) && (keycloak === undefined || keycloak === socket.user);

test("a rolling restart under traffic and a SIGKILL lose nothing, duplicate nothing, reorder nothing", async () => {
  redis = await startRedis();
  const env = { CHANNELS_REDIS_URL: redis.url, ...NODE_ENV };
  for (let i = 0; i < 3; i++) nodes.push(await startNode(env));
  for (const node of nodes) await waitFor(ready(node), 10_000, "nodes ready");
  lb = await startHaproxy(nodes);
  for (let c = 0; c < CHANNELS; c++) {
    for (let u = 0; u < USERS; u++) clients.push(await client(`u${u}`, `c${c}`));
  }

  const stop = { now: false };
  const posting = poster(stop);
  await sleep(1000);
  const started = Date.now();
  for (let i = 0; i < nodes.length; i++) {
    const addr = nodes[i].url.replace("http://", "");
    await nodes[i].stop(); // SIGTERM; resolves once it has exited
    nodes[i] = await startNode({ ...env, CHANNELS_LISTEN: addr });
    await waitFor(ready(nodes[i]), 10_000, `node ${i} back`);
    await sleep(1500); // HAProxy's health check: two passes, 500 ms apart
  }
  // A call may be in flight to it: with its Idempotency-Key, the retry
  // finds the answer the publish kept, or publishes for the first time.
  nodes[1].child.kill("SIGKILL");
  await sleep(3000);
  stop.now = true;
  const sent = await posting;
  const drill = Date.now() - started;

  await waitFor(async () => clients.every((socket) => socket.connected), 30_000, "every client connected");
  const expected = clients.map((socket) => sent.filter((n) => targets(socket, n)).map((n) => n.msg));
  // Not an error by itself: the counts below say what is missing.
  await waitFor(
    async () => clients.every((socket, i) => socket.received.length >= expected[i].length),
    15_000,
    "every notification delivered",
  ).catch(() => {});
  await sleep(500); // Anything extra (a duplicate) would arrive by now.
  // Lost: expected, never received. Extra: received beyond the expected
  // ones (duplicates). Out of order: received after one that was sent later.
  let [lost, extra, outOfOrder, received] = [0, 0, 0, 0];
  for (const [i, socket] of clients.entries()) {
    const got = new Set(socket.received);
    const rank = new Map(expected[i].map((msg, k) => [msg, k]));
    const missing = expected[i].filter((msg) => !got.has(msg)).length;
    lost += missing;
    extra += socket.received.length - (expected[i].length - missing);
    let last = -1;
    for (const msg of socket.received) {
      const k = rank.get(msg) ?? -1;
      if (k < last) outOfOrder++;
      last = Math.max(last, k);
    }
    received += socket.received.length;
  }
  const reconnects = clients.reduce((sum, socket) => sum + socket.connects - 1, 0);
  const recovered = clients.reduce((sum, socket) => sum + socket.recoveries, 0);
  const deliveries = expected.reduce((sum, list) => sum + list.length, 0);
  console.log(
    `drill: ${clients.length} clients, ${sent.length} notifications, ${deliveries} deliveries expected, ` +
      `${reconnects} reconnects (${recovered} recovered), ${drill} ms of restarts; lost ${lost}, extra ${extra}`,
  );
  // For `loadtest run chaos`.
  console.log(
    "DRILL " +
      JSON.stringify({
        clients: clients.length,
        notifications: sent.length,
        expected: deliveries,
        received,
        lost,
        extra,
        out_of_order: outOfOrder,
        reconnects,
        recovered,
        ms: drill,
      }),
  );
  for (const [i, socket] of clients.entries()) {
    assert.deepEqual(socket.received, expected[i], `client ${socket.user}/${socket.channel}: ${arrivals(socket)}`);
  }
});
