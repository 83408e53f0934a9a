// POST /disconnect with the official client: the socket sees "io server
// disconnect", does not reconnect on its own, and its session cannot be
// recovered, standalone and across two nodes on a Redis.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { io } from "socket.io-client";
import { API_KEY, startNode, startRedis, wsToken } from "./helpers.mjs";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function disconnect(node, body) {
  const response = await fetch(`${node.url}/disconnect`, {
    method: "POST",
    headers: { "content-type": "application/json", "x-api-key": API_KEY },
    body: JSON.stringify(body),
  });
  return { status: response.status, body: await response.json() };
}

async function open(node, user, channel) {
  const socket = io(node.url, {
    auth: async (cb) => cb({ token: await wsToken(node, user), keycloakID: user, channel }),
    transports: ["websocket"],
    reconnectionDelay: 50,
    reconnectionDelayMax: 100,
    forceNew: true,
  });
  socket.reasons = [];
  socket.on("disconnect", (reason) => socket.reasons.push(reason));
  await new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("connect_error", reject);
  });
  return socket;
}

describe("POST /disconnect", () => {
  let redis;
  let nodes;
  before(async () => {
    redis = await startRedis();
    nodes = [await startNode({ CHANNELS_REDIS_URL: redis.url }), await startNode({ CHANNELS_REDIS_URL: redis.url })];
    for (const node of nodes) {
      while ((await fetch(`${node.url}/readyz`)).status !== 200) await sleep(20);
    }
  });
  after(async () => {
    for (const node of nodes ?? []) await node.stop();
    await redis?.stop();
  });

  test("the client sees io server disconnect, stays down, and cannot recover", async () => {
    const a = await open(nodes[0], "mia", "admin");
    const b = await open(nodes[1], "mia", "b2b");
    const answer = await disconnect(nodes[1], { keycloak: "mia" });
    assert.deepEqual(answer, { status: 200, body: { disconnected: 2, complete: true } });
    await sleep(300);
    for (const socket of [a, b]) {
      assert.deepEqual(socket.reasons, ["io server disconnect"]);
      assert.equal(socket.active, false, "no reconnection on its own");
      assert.equal(socket.connected, false);
    }
    // Reconnecting by hand with its pid: a fresh session.
    a.connect();
    await new Promise((resolve) => a.once("connect", resolve));
    assert.equal(a.recovered, false);
    // It did present its pid: the node refused it as closed.
    const metrics = await (await fetch(`${nodes[0].url}/metrics`)).text();
    assert.match(metrics, /channels_recoveries_total\{outcome="closed"\} 1/);
    a.close();
    b.close();
  });

  test("revoke: tokens minted before it neither connect nor recover, newer ones do", async () => {
    const old = await wsToken(nodes[0], "noa");
    // A page with a static auth object, as the AMPER docs show.
    const socket = io(nodes[0].url, {
      auth: { token: old, keycloakID: "noa", channel: "admin" },
      transports: ["websocket"],
      forceNew: true,
    });
    await new Promise((resolve) => socket.once("connect", resolve));
    await sleep(5);
    const answer = await disconnect(nodes[1], { keycloak: "noa", revoke: true });
    assert.deepEqual(answer, { status: 200, body: { disconnected: 1, complete: true } });
    await sleep(200);
    // Back with its pid and the old token: refused.
    socket.connect();
    const refused = await new Promise((resolve) => socket.once("connect_error", resolve));
    assert.equal(refused.message, "unauthorized");
    socket.close();
    for (const node of nodes) {
      const again = io(node.url, { auth: { token: old, keycloakID: "noa", channel: "admin" }, reconnection: false, forceNew: true });
      const error = await new Promise((resolve) => again.once("connect_error", resolve));
      assert.equal(error.message, "unauthorized");
      again.close();
    }
    const fresh = await open(nodes[1], "noa", "admin");
    assert.equal(fresh.connected, true);
    fresh.close();
  });
});
