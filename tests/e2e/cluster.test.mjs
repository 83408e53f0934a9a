// Three nodes, one Redis, HAProxy from deploy/: the official client on its
// default transports (polling, then upgrade) through the balancer.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { io } from "socket.io-client";
import { notify, startHaproxy, startNode, startRedis, upgraded, wsToken } from "./helpers.mjs";

let redis;
let nodes;
let lb;
before(async () => {
  redis = await startRedis();
  nodes = [];
  for (let i = 0; i < 3; i++) nodes.push(await startNode({ CHANNELS_REDIS_URL: redis.url }));
  for (const node of nodes) await waitFor(async () => (await fetch(`${node.url}/readyz`)).status === 200);
  lb = await startHaproxy(nodes);
});
after(async () => {
  await lb?.stop();
  for (const node of nodes ?? []) await node.stop();
  await redis?.stop();
});

async function waitFor(check, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error("condition not met in time");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function socketsOn(node) {
  const text = await (await fetch(`${node.url}/metrics`)).text();
  return Number(text.match(/^channels_sockets (\d+)/m)[1]);
}

/** A client through the balancer that reconnects (with its cookie jar). */
async function client(user, channel) {
  const token = await wsToken({ url: lb.url }, user);
  const socket = io(lb.url, {
    auth: { token, keycloakID: user, channel },
    withCredentials: true,
    reconnectionDelay: 100,
    reconnectionDelayMax: 500,
    forceNew: true,
  });
  socket.received = [];
  socket.on("notification", (msg) => socket.received.push(msg));
  await new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("connect_error", reject);
  });
  await upgraded(socket);
  return socket;
}

const received = (socket, msg) => waitFor(async () => socket.received.some((m) => m === msg), 5000);

test("clients spread over the nodes and every variant reaches them across nodes", async () => {
  const clients = [];
  for (let i = 0; i < 9; i++) clients.push(await client(`user${i % 3}`, `chan${i % 2}`));
  const counts = await Promise.all(nodes.map(socketsOn));
  assert.equal(counts.reduce((a, b) => a + b), 9);
  assert.ok(counts.filter((n) => n > 0).length >= 2, `all on one node: ${counts}`);
  try {
    // Each variant, posted to each node directly and through the balancer.
    for (const [i, via] of [...nodes, lb].entries()) {
      const tag = `via${i}`;
      assert.equal((await notify(via, { msg: `${tag}-c`, channel: "chan0" })).status, 200);
      assert.equal((await notify(via, { msg: `${tag}-u`, keycloak: "user1" })).status, 200);
      assert.equal((await notify(via, { msg: `${tag}-uc`, keycloak: "user2", channel: "chan1" })).status, 200);
      for (const [k, socket] of clients.entries()) {
        const [user, channel] = [`user${k % 3}`, `chan${k % 2}`];
        if (channel === "chan0") await received(socket, `${tag}-c`);
        if (user === "user1") await received(socket, `${tag}-u`);
        if (user === "user2" && channel === "chan1") await received(socket, `${tag}-uc`);
      }
    }
    // And nothing reached a socket it did not target.
    for (const [k, socket] of clients.entries()) {
      const [user, channel] = [`user${k % 3}`, `chan${k % 2}`];
      for (const msg of socket.received) {
        const kind = msg.split("-")[1];
        const ok = (kind === "c" && channel === "chan0") || (kind === "u" && user === "user1") ||
          (kind === "uc" && user === "user2" && channel === "chan1");
        assert.ok(ok, `socket ${user}/${channel} got ${msg}`);
      }
    }
  } finally {
    for (const socket of clients) socket.close();
  }
});

test("after SIGTERM on a node its clients reconnect through the balancer and keep receiving", async () => {
  const clients = [];
  for (let i = 0; i < 6; i++) clients.push(await client(`mover${i}`, "moving"));
  const counts = await Promise.all(nodes.map(socketsOn));
  const victim = counts.indexOf(Math.max(...counts));
  assert.ok(counts[victim] > 0);
  const disconnected = clients.map((socket) => new Promise((resolve) => socket.once("disconnect", resolve)));
  await nodes[victim].stop(); // SIGTERM, waits for exit
  const survivors = nodes.filter((_, i) => i !== victim);
  // Its clients were disconnected and are all back, on the other nodes.
  await Promise.race([Promise.any(disconnected), new Promise((resolve) => setTimeout(resolve, 5000))]);
  await waitFor(async () => clients.every((socket) => socket.connected));
  await waitFor(async () => (await Promise.all(survivors.map(socketsOn))).reduce((a, b) => a + b) === 6);
  try {
    assert.equal((await notify(lb, { msg: "after-stop", channel: "moving" })).status, 200);
    for (const socket of clients) await received(socket, "after-stop");
  } finally {
    for (const socket of clients) socket.close();
  }
});
