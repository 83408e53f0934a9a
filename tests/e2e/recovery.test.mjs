// Connection state recovery with the official client, through a TCP proxy
// that plays the balancer: what a socket missed while away arrives on its
// return, exactly once, in order, before anything newer; what cannot be
// recovered gives `recovered === false` and nothing stale.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { after, before, describe, test } from "node:test";
import { io } from "socket.io-client";
import { notify, startNode, startProxy, startRedis, startRedisCluster, startRedisSentinel, wsToken } from "./helpers.mjs";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(check, ms = 10_000, what = "condition") {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what} not met in time`);
    await sleep(20);
  }
}

/**
 * A frontend as the README shows it: the `auth` callback fetches a fresh ws
 * token at every (re)connect unless `token` pins one. Records every
 * notification and, per connect, `socket.recovered`.
 */
const opened = [];
after(() => opened.forEach((socket) => socket.close()));

async function frontend(via, node, user, channel, transports, token) {
  const socket = io(via.url, {
    auth: async (cb) => cb({ token: token ?? (await wsToken(node, user)), keycloakID: user, channel }),
    transports,
    reconnectionDelay: 50,
    reconnectionDelayMax: 100,
    randomizationFactor: 0,
    forceNew: true,
  });
  opened.push(socket);
  socket.received = [];
  socket.recoveries = [];
  socket.on("notification", (msg) => socket.received.push(msg));
  socket.on("connect", () => socket.recoveries.push(socket.recovered));
  await new Promise((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("connect_error", reject);
  });
  return socket;
}

/** Cuts the proxy's connections and keeps new ones out until `back()`. */
async function drop(proxy, sockets) {
  proxy.pause();
  proxy.cut();
  await waitFor(() => sockets.every((s) => !s.connected), 5000, "sockets down");
  // The node saw the close too (the proxy closed both sides); give its
  // disconnect handler a moment to record the session's end.
  await sleep(100);
}

async function back(proxy, sockets, connects) {
  proxy.resume();
  await waitFor(() => sockets.every((s) => s.connected && s.recoveries.length >= connects), 15_000, "reconnect");
}

async function post(node, body) {
  const { status } = await notify(node, body);
  assert.equal(status, 200);
}

/** Waits for `expected`, then a quiet moment, and compares exactly. */
async function exactly(socket, expected) {
  await waitFor(() => socket.received.length >= expected.length, 5000, `${expected.length} notifications`).catch(() => {});
  await sleep(200);
  assert.deepEqual(socket.received, expected);
}

/** A node on `bus`, once it answers ready. */
async function readyNode(bus, env = {}) {
  const node = await startNode({ ...bus.env, ...env });
  await waitFor(async () => (await fetch(`${node.url}/readyz`)).status === 200, 10_000, "node ready");
  return node;
}

/** Where the history lives: in the node, a Redis, a Redis Cluster. */
const buses = [
  ["standalone", async () => ({ env: {}, stop: async () => {} })],
  ["a Redis", startRedis],
  ["a Redis Cluster", startRedisCluster],
];

for (const [kind, startBus] of buses) for (const transports of [["websocket"], ["polling"]]) {
  describe(`one node, ${kind}, ${transports[0]}`, () => {
    let bus;
    let node;
    let proxy;
    before(async () => {
      bus = await startBus();
      node = await readyNode(bus);
      proxy = await startProxy(node);
    });
    after(async () => {
      await proxy?.close();
      await node?.stop();
      await bus?.stop();
    });

    test("every variant posted while away arrives on return, in order, then the newer ones", async () => {
      const alice = await frontend(proxy, node, "alice", "admin", transports);
      const bob = await frontend(proxy, node, "bob", "admin", transports);
      await post(node, { msg: "before", channel: "admin" });
      await exactly(alice, ["before"]);
      await drop(proxy, [alice, bob]);
      await post(node, { msg: "c", channel: "admin" });
      await post(node, { msg: "u", keycloak: "alice" });
      await post(node, { msg: "uc", keycloak: "alice", channel: "admin" });
      await post(node, { msg: "elsewhere", keycloak: "alice", channel: "b2b" });
      await post(node, { msg: "bob", keycloak: "bob" });
      await back(proxy, [alice, bob], 2);
      assert.deepEqual(alice.recoveries, [false, true]);
      assert.deepEqual(bob.recoveries, [false, true]);
      await post(node, { msg: "after", channel: "admin" });
      await exactly(alice, ["before", "c", "u", "uc", "after"]);
      await exactly(bob, ["before", "c", "bob", "after"]);
      // A second drop in a row recovers from the new position.
      await drop(proxy, [alice]);
      await post(node, { msg: "again", keycloak: "alice" });
      await back(proxy, [alice], 3);
      assert.deepEqual(alice.recoveries, [false, true, true]);
      await exactly(alice, ["before", "c", "u", "uc", "after", "again"]);
      alice.close();
      bob.close();
    });

    test("a client that had received nothing recovers too", async () => {
      const carol = await frontend(proxy, node, "carol", "admin", transports);
      await drop(proxy, [carol]);
      await post(node, { msg: 1, keycloak: "carol" });
      await post(node, { msg: 2, keycloak: "carol", channel: "admin" });
      await back(proxy, [carol], 2);
      assert.deepEqual(carol.recoveries, [false, true]);
      await exactly(carol, [1, 2]);
      carol.close();
    });

    test("a forged or borrowed pid gets a fresh session and nobody else's notifications", async () => {
      const dave = await frontend(proxy, node, "dave", "admin", transports);
      const eve = await frontend(proxy, node, "eve", "admin", transports);
      await drop(proxy, [dave, eve]);
      await post(node, { msg: "for dave", keycloak: "dave" });
      eve._pid = dave._pid; // eve presents dave's pid, with her own token
      await back(proxy, [dave, eve], 2);
      assert.deepEqual(eve.recoveries, [false, false]);
      assert.deepEqual(dave.recoveries, [false, true]);
      await exactly(eve, []);
      await exactly(dave, ["for dave"]);
      await drop(proxy, [eve]);
      eve._pid = "A".repeat(64);
      await back(proxy, [eve], 3);
      assert.deepEqual(eve.recoveries, [false, false, false]);
      await post(node, { msg: "new", keycloak: "eve" });
      await exactly(eve, ["new"]);
      dave.close();
      eve.close();
    });
  });
}

// The connection dies without a FIN: the node writes into it until the
// heartbeat gives up, and the client, missing its pings, reconnects with
// the last offset it really received.
for (const [kind, startBus] of buses) describe(`one node, ${kind}, a silent network loss`, () => {
  let bus;
  let node;
  let proxy;
  before(async () => {
    bus = await startBus();
    node = await readyNode(bus, { CHANNELS_PING_INTERVAL: "1", CHANNELS_PING_TIMEOUT: "1" });
    proxy = await startProxy(node);
  });
  after(async () => {
    await proxy?.close();
    await node?.stop();
    await bus?.stop();
  });

  for (const transports of [["websocket"], ["polling"]]) {
    test(`what the node wrote into a dead connection arrives on return, ${transports[0]}`, async () => {
      const user = `nina-${transports[0]}`;
      const nina = await frontend(proxy, node, user, "admin", transports);
      await post(node, { msg: 1, keycloak: user });
      await exactly(nina, [1]);
      proxy.blackhole();
      await post(node, { msg: 2, keycloak: user });
      await post(node, { msg: 3, keycloak: user, channel: "admin" });
      await post(node, { msg: 4, channel: "admin" });
      assert.ok(nina.connected, "the client has not noticed yet");
      await waitFor(() => nina.recoveries.length >= 2, 15_000, "the client's return");
      assert.deepEqual(nina.recoveries, [false, true]);
      await post(node, { msg: 5, keycloak: user });
      await exactly(nina, [1, 2, 3, 4, 5]);
      nina.close();
    });
  }
});

for (const [kind, startBus] of buses) describe(`one node, ${kind}, limits`, () => {
  let bus;
  before(async () => {
    bus = await startBus();
  });
  after(async () => {
    await bus?.stop();
  });

  test("past the window: recovered is false, nothing stale, new ones arrive", async () => {
    const node = await readyNode(bus, { CHANNELS_RECOVERY_WINDOW: "1" });
    const proxy = await startProxy(node);
    try {
      const frank = await frontend(proxy, node, "frank", "admin", ["websocket"]);
      await drop(proxy, [frank]);
      await post(node, { msg: "stale", keycloak: "frank" });
      await sleep(1500);
      await back(proxy, [frank], 2);
      assert.deepEqual(frank.recoveries, [false, false]);
      await post(node, { msg: "fresh", keycloak: "frank" });
      await exactly(frank, ["fresh"]);
      frank.close();
    } finally {
      await proxy.close();
      await node.stop();
    }
  });

  // A phone that falls behind on a bad network: evicted, not lost.
  test("a slow client that was evicted reconnects and recovers", async () => {
    const node = await readyNode(bus, { CHANNELS_SOCKET_QUEUE_BYTES: "65536" });
    const evicted = async () => {
      const text = await (await fetch(`${node.url}/metrics`)).text();
      return Number(/^channels_slow_client_disconnects_total (\d+)/m.exec(text)?.[1] ?? 0);
    };
    try {
      const ivan = await frontend(node, node, "ivan", "admin", ["websocket"]);
      // The client stops reading: the kernel's buffers fill, then its
      // queue on the node (64 KiB here), and the node evicts it.
      const tcp = ivan.io.engine.transport.ws._socket;
      tcp.pause();
      const pad = "x".repeat(50_000);
      const sent = [];
      for (let n = 0; n < 200 && (await evicted()) === 0; n++) {
        await post(node, { msg: { n, pad }, keycloak: "ivan", channel: "admin" });
        sent.push(n);
      }
      assert.equal(await evicted(), 1, "evicted as a slow client");
      tcp.resume();
      await waitFor(() => ivan.connected && ivan.recoveries.length === 2, 15_000, "reconnect");
      assert.deepEqual(ivan.recoveries, [false, true]);
      await post(node, { msg: { n: "after" }, keycloak: "ivan" });
      sent.push("after");
      await waitFor(() => ivan.received.length >= sent.length, 10_000, `${sent.length} notifications`).catch(() => {});
      await sleep(200);
      assert.deepEqual(
        ivan.received.map((msg) => msg.n),
        sent,
      );
      ivan.close();
    } finally {
      await node.stop();
    }
  });

  test("more missed than CHANNELS_RECOVERY_MAX_MISSED is not recoverable", async () => {
    const node = await readyNode(bus, { CHANNELS_RECOVERY_MAX_MISSED: "3" });
    const proxy = await startProxy(node);
    try {
      const gina = await frontend(proxy, node, "gina", "admin", ["websocket"]);
      const hank = await frontend(proxy, node, "hank", "admin", ["websocket"]);
      await drop(proxy, [gina, hank]);
      for (const n of [1, 2, 3, 4]) await post(node, { msg: n, keycloak: "gina" });
      for (const n of [1, 2, 3]) await post(node, { msg: n, keycloak: "hank" });
      await back(proxy, [gina, hank], 2);
      assert.deepEqual(gina.recoveries, [false, false]);
      assert.deepEqual(hank.recoveries, [false, true]);
      await exactly(gina, []);
      await exactly(hank, [1, 2, 3]);
      gina.close();
      hank.close();
    } finally {
      await proxy.close();
      await node.stop();
    }
  });

  test("an expired ws token recovers its session but opens no new one", async () => {
    const node = await readyNode(bus, { CHANNELS_WS_TOKEN_TTL: "1" });
    const proxy = await startProxy(node);
    try {
      const token = await wsToken(node, "ivy");
      // A static token, as a frontend written from the AMPER docs passes it.
      const ivy = await frontend(proxy, node, "ivy", "admin", ["websocket"], token);
      await sleep(7000); // past its lifetime and the 5 s leeway
      await drop(proxy, [ivy]);
      await post(node, { msg: "while away", keycloak: "ivy" });
      await back(proxy, [ivy], 2);
      assert.deepEqual(ivy.recoveries, [false, true]);
      await exactly(ivy, ["while away"]);
      const socket = io(node.url, { auth: { token, keycloakID: "ivy", channel: "admin" }, reconnection: false, forceNew: true });
      const error = await new Promise((resolve) => socket.once("connect_error", resolve));
      assert.equal(error.message, "unauthorized");
      socket.close();
      ivy.close();
    } finally {
      await proxy.close();
      await node.stop();
    }
  });
});

for (const [kind, startBus] of [
  ["a Redis", startRedis],
  ["a Redis Cluster", startRedisCluster],
]) describe(`two nodes and ${kind}`, () => {
  let redis;
  let nodes;
  let proxy;
  before(async () => {
    redis = await startBus();
    nodes = [];
    for (let i = 0; i < 2; i++) nodes.push(await readyNode(redis));
    proxy = await startProxy(nodes[0]);
  });
  after(async () => {
    await proxy?.close();
    for (const node of nodes ?? []) await node.stop();
    await redis?.stop();
  });

  for (const transports of [["websocket"], ["polling"]]) {
    // A polling session moves before its old node saw it leave: the old
    // node closes its socket when the new one asks.
    test(`a session recovers on the other node, ${transports[0]}`, async () => {
      proxy.to(nodes[0]);
      const user = `jack-${transports[0]}`;
      const jack = await frontend(proxy, nodes[0], user, "admin", transports);
      await post(nodes[1], { msg: "first", keycloak: user });
      await exactly(jack, ["first"]);
      await drop(proxy, [jack]);
      await post(nodes[0], { msg: "c", channel: "admin" });
      await post(nodes[1], { msg: "u", keycloak: user });
      await post(nodes[0], { msg: "uc", keycloak: user, channel: "admin" });
      proxy.to(nodes[1]);
      await back(proxy, [jack], 2);
      assert.deepEqual(jack.recoveries, [false, true]);
      await post(nodes[0], { msg: "after", keycloak: user });
      await exactly(jack, ["first", "c", "u", "uc", "after"]);
      jack.close();
    });
  }

  // The killed node wrote no record: its heartbeat, once old enough, tells
  // when the session ended.
  test("a session recovers after its node was SIGKILLed", async () => {
    const victim = await readyNode(redis);
    proxy.to(victim);
    const kate = await frontend(proxy, nodes[0], "kate", "admin", ["websocket"]);
    await post(nodes[0], { msg: "first", keycloak: "kate" });
    await exactly(kate, ["first"]);
    proxy.pause();
    const exited = new Promise((resolve) => victim.child.on("exit", resolve));
    victim.child.kill("SIGKILL");
    await exited;
    await waitFor(() => !kate.connected, 5000, "socket down");
    await post(nodes[0], { msg: "missed 1", keycloak: "kate" });
    await post(nodes[1], { msg: "missed 2", channel: "admin" });
    proxy.to(nodes[1]);
    await back(proxy, [kate], 2);
    assert.deepEqual(kate.recoveries, [false, true]);
    await exactly(kate, ["first", "missed 1", "missed 2"]);
    kate.close();
  });

  // A frozen node (a stalled VM; SIGSTOP here) writes nothing, not even its
  // heartbeat: its clients miss their pings and come back elsewhere, and
  // its heartbeat, once old enough, tells when their sessions ended. When
  // it thaws, it closes what it held and changes nothing for them.
  test("a session recovers after its node froze, and the thaw changes nothing", async () => {
    const victim = await readyNode(redis, { CHANNELS_PING_INTERVAL: "1", CHANNELS_PING_TIMEOUT: "1" });
    proxy.to(victim);
    const liam = await frontend(proxy, nodes[0], "liam", "admin", ["websocket"]);
    await post(nodes[0], { msg: "first", keycloak: "liam" });
    await exactly(liam, ["first"]);
    proxy.to(nodes[1]);
    victim.child.kill("SIGSTOP");
    try {
      await post(nodes[0], { msg: "missed 1", keycloak: "liam" });
      await post(nodes[1], { msg: "missed 2", channel: "admin" });
      await waitFor(() => liam.recoveries.length >= 2, 15_000, "the client's return");
      assert.deepEqual(liam.recoveries, [false, true]);
      await exactly(liam, ["first", "missed 1", "missed 2"]);
    } finally {
      victim.child.kill("SIGCONT");
    }
    await waitFor(async () => (await fetch(`${victim.url}/healthz`)).status === 200, 5000, "the thaw");
    await sleep(1500);
    await post(victim, { msg: "after the thaw", keycloak: "liam" });
    await exactly(liam, ["first", "missed 1", "missed 2", "after the thaw"]);
    await drop(proxy, [liam]);
    await post(nodes[0], { msg: "again", keycloak: "liam" });
    await back(proxy, [liam], 3);
    assert.deepEqual(liam.recoveries, [false, true, true]);
    await exactly(liam, ["first", "missed 1", "missed 2", "after the thaw", "again"]);
    liam.close();
    await victim.stop();
  });
});

test("Redis down at reconnect: a fresh session, which works once Redis is back", async () => {
  const redis = await startRedis();
  const node = await startNode({ CHANNELS_REDIS_URL: redis.url });
  const proxy = await startProxy(node);
  try {
    await waitFor(async () => (await fetch(`${node.url}/readyz`)).status === 200);
    const lena = await frontend(proxy, node, "lena", "admin", ["websocket"]);
    await drop(proxy, [lena]);
    await redis.stop();
    await back(proxy, [lena], 2);
    assert.deepEqual(lena.recoveries, [false, false]);
    const restarted = await startRedis(redis.port);
    try {
      await waitFor(async () => (await fetch(`${node.url}/readyz`)).status === 200, 15_000, "ready again");
      await post(node, { msg: "back", keycloak: "lena" });
      await exactly(lena, ["back"]);
    } finally {
      await restarted.stop();
    }
    lena.close();
  } finally {
    await proxy.close();
    await node.stop();
  }
});

test("Redis evicted keys while a socket was away: a fresh session, nothing stale, new ones arrive", async () => {
  const redis = await startRedis();
  const node = await readyNode(redis);
  const proxy = await startProxy(node);
  try {
    const mia = await frontend(proxy, node, "mia", "admin", ["websocket"]);
    await post(node, { msg: "before", keycloak: "mia" });
    await exactly(mia, ["before"]);
    await drop(proxy, [mia]);
    await post(node, { msg: "missed", keycloak: "mia" });
    // Memory pressure under an eviction policy: Redis evicts keys of its
    // choosing, perhaps mia's history, perhaps only the filler.
    redis.cli("CONFIG", "SET", "maxmemory-policy", "allkeys-random");
    redis.cli("EVAL", "for i = 1, 500 do redis.call('SET', 'filler:' .. i, string.rep('x', 10000)) end", "0");
    const used = Number(redis.cli("INFO", "memory").match(/used_memory:(\d+)/)[1]);
    redis.cli("CONFIG", "SET", "maxmemory", String(used - 1_000_000));
    assert.ok(Number(redis.cli("INFO", "stats").match(/evicted_keys:(\d+)/)[1]) > 0, "Redis evicted keys");
    redis.cli("CONFIG", "SET", "maxmemory", "0");
    await back(proxy, [mia], 2);
    assert.deepEqual(mia.recoveries, [false, false], "recovered, though the history may have lost entries");
    const metrics = await (await fetch(`${node.url}/metrics`)).text();
    // As `trimmed` (the epoch moved past it), or `no_record` when the
    // session's own record was among the evicted keys.
    assert.match(metrics, /recoveries_total\{outcome="recovered"\} 0\n/);
    await post(node, { msg: "after", keycloak: "mia" });
    await exactly(mia, ["before", "after"]);
    // The history holds again from here: the next drop recovers.
    await drop(proxy, [mia]);
    await post(node, { msg: "later", keycloak: "mia" });
    await back(proxy, [mia], 3);
    assert.deepEqual(mia.recoveries, [false, false, true]);
    await exactly(mia, ["before", "after", "later"]);
    mia.close();
  } finally {
    await proxy.close();
    await node.stop();
    await redis.stop();
  }
});

/**
 * A failover of the Redis that `startBus` starts, made by `fail` while Mia
 * is away: Noa, who stayed, receives `first` and then everything `fail`
 * posted (`noaAfter`); Mia, whose offset is from before the failover (the
 * promoted replica may lack the old master's last writes), gets a fresh
 * session and nothing stale, and a session that began after it recovers.
 */
async function failover(startBus, fail) {
  const redis = await startBus();
  let node;
  let proxy;
  try {
    node = await readyNode(redis);
    proxy = await startProxy(node);
    const mia = await frontend(proxy, node, "mia", "admin", ["websocket"]);
    const noa = await frontend(node, node, "noa", "admin", ["websocket"]);
    await post(node, { msg: "first", channel: "admin" });
    await exactly(mia, ["first"]);
    await drop(proxy, [mia]);
    const noaAfter = await fail(redis, node);
    await exactly(noa, ["first", ...noaAfter]);
    await back(proxy, [mia], 2);
    assert.deepEqual(mia.recoveries, [false, false]);
    await exactly(mia, ["first"]);
    await drop(proxy, [mia]);
    await post(node, { msg: "missed again", channel: "admin" });
    await back(proxy, [mia], 3);
    assert.deepEqual(mia.recoveries, [false, false, true]);
    await exactly(mia, ["first", "missed again"]);
    await exactly(noa, ["first", ...noaAfter, "missed again"]);
    mia.close();
    noa.close();
  } finally {
    await proxy?.close();
    await node?.stop();
    await redis.stop();
  }
}

test("a Sentinel failover: 503 without a master, then served again; a session from before is not replayed in part", async () => {
  await failover(startRedisSentinel, async (redis, node) => {
    const before = redis.masterPort();
    await redis.killMaster();
    await waitFor(async () => (await notify(node, { msg: "nowhere", channel: "admin" })).status === 503, 5000, "503");
    await waitFor(async () => (await fetch(`${node.url}/readyz`)).status === 200, 30_000, "served again");
    assert.notEqual(redis.masterPort(), before, "the Sentinels promoted the replica");
    await post(node, { msg: "missed", channel: "admin" });
    return ["missed"];
  });
});

/**
 * Posts `body` until it is answered 200, with one Idempotency-Key: a call
 * that met the failover may have been published and still answered 503.
 */
async function postThrough(node, body, key) {
  await waitFor(async () => (await notify(node, body, { "idempotency-key": key })).status === 200, 15_000, `${key} accepted`);
}

test("a Redis Cluster failover that lost the master's last write: a session from before is not recovered, and what is posted after reaches every socket", async () => {
  await failover(() => startRedisCluster({ replicas: 1 }), async (redis, node) => {
    // The replica of the history's master misses what follows: stopped,
    // its link cut. Then the master dies and the replica takes over.
    const master = redis.master("{channels}");
    const replica = redis.replicaOf(master);
    redis.signal(replica, "SIGSTOP");
    assert.match(redis.cli(master, "CLIENT", "KILL", "TYPE", "replica"), /1/);
    await post(node, { msg: "lost with the master", channel: "admin" });
    redis.signal(master, "SIGKILL");
    redis.signal(replica, "SIGCONT");
    assert.match(redis.cli(replica, "CLUSTER", "FAILOVER", "TAKEOVER"), /OK/);
    await postThrough(node, { msg: "after", channel: "admin" }, "after-takeover");
    return ["lost with the master", "after"];
  });
});

/**
 * Node a loses its bus (`away`) while node b does not, and b publishes
 * meanwhile; once a is `back`, its sockets must have everything, exactly
 * once, in order, without reconnecting: a reads it from the history.
 */
async function lostByOneNode(a, b, away, back) {
  const noa = await frontend(a, a, "noa", "admin", ["websocket"]);
  const mia = await frontend(a, a, "mia", "b2b", ["polling"]);
  await post(b, { msg: "before", channel: "admin" });
  await exactly(noa, ["before"]);
  await away();
  await post(b, { msg: "while a was away 1", channel: "admin" });
  await post(b, { msg: "while a was away 2", keycloak: "noa" });
  await post(b, { msg: "while a was away 3", keycloak: "mia", channel: "b2b" });
  await post(b, { msg: "elsewhere", channel: "ops" });
  await back();
  const metrics = async () => (await fetch(`${a.url}/metrics`)).text();
  await waitFor(async () => /\nchannels_bus_reconnects_total 1\n/.test(await metrics()), 15_000, "a reconnected");
  await waitFor(async () => (await fetch(`${a.url}/readyz`)).status === 200, 15_000, "a ready again");
  await post(b, { msg: "after", channel: "admin" });
  await post(a, { msg: "after", keycloak: "mia" });
  await exactly(noa, ["before", "while a was away 1", "while a was away 2", "after"]);
  await exactly(mia, ["while a was away 3", "after"]);
  // Nothing was lost, so nobody reconnected: node a read the three from
  // the history (not "elsewhere": no socket of it is in that channel).
  assert.deepEqual([noa.recoveries, mia.recoveries], [[false], [false]]);
  assert.match(await metrics(), /\nchannels_bus_caught_up_total 3\n/);
  noa.close();
  mia.close();
}

/**
 * Node a on a Redis through a proxy that can cut it off (`away`, `back`),
 * node b on the same Redis directly, both with `env`; runs `scene` with
 * them and the Redis.
 */
async function oneNodeCutOff(env, scene, { redisConfig = [] } = {}) {
  const redis = await startRedis();
  if (redisConfig.length) redis.cli("CONFIG", "SET", ...redisConfig);
  const link = await startProxy({ url: redis.url.replace("redis:", "http:") });
  const a = await readyNode({ env: { CHANNELS_REDIS_URL: link.url.replace("http:", "redis:"), ...env } });
  const b = await readyNode(redis, env);
  const away = async () => {
    link.pause();
    link.cut();
    await waitFor(async () => (await fetch(`${a.url}/readyz`)).status === 503, 5000, "a not ready");
  };
  try {
    await scene(a, b, away, async () => link.resume(), redis);
  } finally {
    await link.close();
    await a.stop();
    await b.stop();
    await redis.stop();
  }
}

test("a node that lost Redis while the others did not: once back, its sockets receive what was posted meanwhile, exactly once, in order", async () => {
  await oneNodeCutOff({}, lostByOneNode);
});

// What the history cannot give whole is never delivered in part: here a
// user got more than the max missed while node a was away, and its stream
// was trimmed (exactly: one entry per stream node). Node a closes that
// user's socket before it writes anything more to it; its client
// reconnects and is told it did not recover. The others catch up.
test("a node that lost Redis while its sockets missed more than the history gives whole: those sockets reconnect, not recovered, and the others catch up", async () => {
  const max = { CHANNELS_RECOVERY_MAX_MISSED: "3" };
  await oneNodeCutOff(max, async (a, b, away, back) => {
    const noa = await frontend(a, a, "noa", "admin", ["websocket"]);
    const mia = await frontend(a, a, "mia", "b2b", ["polling"]);
    await post(b, { msg: "before", channel: "admin" });
    await exactly(noa, ["before"]);
    await away();
    for (let i = 1; i <= 4; i++) await post(b, { msg: `for noa ${i}`, keycloak: "noa" });
    await post(b, { msg: "for mia", keycloak: "mia", channel: "b2b" });
    await back();
    await waitFor(() => noa.connected && noa.recoveries.length === 2, 15_000, "noa back");
    await waitFor(async () => (await fetch(`${a.url}/readyz`)).status === 200, 15_000, "a ready again");
    await post(b, { msg: "after", keycloak: "noa" });
    await post(b, { msg: "after", keycloak: "mia" });
    await exactly(noa, ["before", "after"]);
    await exactly(mia, ["for mia", "after"]);
    assert.deepEqual([noa.recoveries, mia.recoveries], [[false, false], [false]]);
    noa.close();
    mia.close();
  }, { redisConfig: ["stream-node-max-entries", "1"] });
});

// Away longer than the retention (window, ping interval and timeout: 3 s
// here), a stream that got nothing newer may have expired: node a cannot
// tell what its sockets missed, so every one of them reconnects, ended as
// of the loss, which is past the window: not recovered.
test("a node that lost Redis for longer than the retention while the others posted: every socket of it reconnects, not recovered", async () => {
  const short = { CHANNELS_RECOVERY_WINDOW: "1", CHANNELS_PING_INTERVAL: "1", CHANNELS_PING_TIMEOUT: "1" };
  await oneNodeCutOff(short, async (a, b, away, back) => {
    const noa = await frontend(a, a, "noa", "admin", ["websocket"]);
    const mia = await frontend(a, a, "mia", "b2b", ["polling"]);
    await away();
    await post(b, { msg: "while a was away", keycloak: "mia", channel: "b2b" });
    await sleep(3500);
    await back();
    await waitFor(() => [noa, mia].every((s) => s.connected && s.recoveries.length === 2), 15_000, "both back");
    await post(b, { msg: "after", channel: "admin" });
    await post(b, { msg: "after", keycloak: "mia" });
    await exactly(noa, ["after"]);
    await exactly(mia, ["after"]);
    assert.deepEqual([noa.recoveries, mia.recoveries], [[false, false], [false, false]]);
    noa.close();
    mia.close();
  });
});

// Redis evicted every key while node a was away, mia's stream with what
// she missed among them, and node b noticed first (its reconnect found the
// history's records gone): a's catch-up cannot give what its sockets
// missed, so every one of them reconnects, not recovered, rather than
// staying connected without it.
test("a node that lost Redis while Redis evicted keys that another node noticed first: every socket of it reconnects, not recovered", async () => {
  await oneNodeCutOff({}, async (a, b, away, back, redis) => {
    const noa = await frontend(a, a, "noa", "admin", ["websocket"]);
    const mia = await frontend(a, a, "mia", "b2b", ["polling"]);
    await post(b, { msg: "before", channel: "admin" });
    await exactly(noa, ["before"]);
    await away();
    await post(b, { msg: "while a was away", keycloak: "mia", channel: "b2b" });
    redis.cli("CONFIG", "SET", "maxmemory-policy", "allkeys-random");
    redis.cli("CONFIG", "SET", "maxmemory", "1");
    await waitFor(async () => redis.cli("DBSIZE") === "0", 5000, "every key evicted");
    redis.cli("CONFIG", "SET", "maxmemory", "0");
    redis.cli("CLIENT", "KILL", "TYPE", "pubsub");
    // b's reconnect finds the history's records gone: a new epoch.
    await waitFor(async () => redis.cli("EXISTS", "channels:master") === "1", 15_000, "b reconnected");
    await back();
    await waitFor(() => [noa, mia].every((s) => s.connected && s.recoveries.length === 2), 15_000, "both back");
    await waitFor(async () => (await fetch(`${a.url}/readyz`)).status === 200, 15_000, "a ready again");
    await post(b, { msg: "after", channel: "admin" });
    await post(b, { msg: "after", keycloak: "mia" });
    await exactly(noa, ["before", "after"]);
    await exactly(mia, ["after"]);
    assert.deepEqual([noa.recoveries, mia.recoveries], [[false, false], [false, false]]);
    noa.close();
    mia.close();
  });
});

// A Redis Cluster client finds each master's address itself, so a proxy
// cannot stand in its way: node a is stopped (SIGSTOP) and the masters
// close its connections (CLIENT KILL of each address `ss` shows it
// holding), as Redis does to a client it times out or that overflows its
// pub/sub output buffer. Resumed, it finds them closed.
test("a node that lost its Redis Cluster connections while the others did not: once back, its sockets receive what was posted meanwhile, exactly once, in order", async () => {
  const redis = await startRedisCluster();
  const a = await readyNode(redis);
  const b = await readyNode(redis);
  const masters = redis.env.CHANNELS_REDIS_URL.split(",").map((url) => new URL(url).port);
  try {
    const away = async () => {
      a.child.kill("SIGSTOP");
      const held = execFileSync("ss", ["-tnpH", "state", "established"]).toString().split("\n")
        .filter((line) => line.includes(`pid=${a.child.pid},`))
        .map((line) => line.trim().split(/\s+/).slice(2, 4))
        .filter(([, peer]) => masters.includes(peer.split(":").pop()));
      for (const [local, peer] of held) redis.cli(peer.split(":").pop(), "CLIENT", "KILL", "ADDR", local);
      // Its subscriptions and its commands, on each master it reached.
      assert.ok(held.length >= 2, `node a held ${held.length} Redis connections`);
    };
    await lostByOneNode(a, b, away, async () => a.child.kill("SIGCONT"));
  } finally {
    a.child.kill("SIGCONT");
    await a.stop();
    await b.stop();
    await redis.stop();
  }
});

/**
 * A master `old` and a Redis `promoted`, with a proxy that plays their one
 * DNS name (`viaName`, a node's env); `demote()` makes `old` a replica of
 * `promoted`, keeping its connections, and points the name at `promoted`.
 */
async function demotedMaster(scene) {
  const old = await startRedis();
  const promoted = await startRedis();
  const name = await startProxy({ url: old.url.replace("redis:", "http:") });
  const viaName = { CHANNELS_REDIS_URL: name.url.replace("http:", "redis:") };
  const demote = () => {
    old.cli("REPLICAOF", "127.0.0.1", String(promoted.port));
    name.to({ url: promoted.url.replace("redis:", "http:") });
  };
  try {
    await scene({ viaName, promoted, demote });
  } finally {
    await name.close();
    await old.stop();
    await promoted.stop();
  }
}

test("a master demoted without losing its connections (one DNS name moved to the new master): the node reconnects and serves again", async () => {
  await demotedMaster(async ({ viaName, demote }) => {
    const node = await readyNode({ env: viaName });
    try {
      const noa = await frontend(node, node, "noa", "admin", ["websocket"]);
      await post(node, { msg: "before", channel: "admin" });
      await exactly(noa, ["before"]);
      demote();
      // Its writes now fail with READONLY on the old master (its heartbeat's
      // within a second): the node reconnects, through the name, to the new one.
      await postThrough(node, { msg: "after", channel: "admin" }, "after-demotion");
      await exactly(noa, ["before", "after"]);
      noa.close();
    } finally {
      await node.stop();
    }
  });
});

// With recovery off a node publishes with a bare PUBLISH, which a replica
// takes and delivers only to its own subscribers: a node left on the
// demoted master published into the void, each call answered 200, and
// never noticed. Its heartbeat, a write, is answered READONLY.
test("a master demoted without losing its connections, recovery off: the node left on it reconnects within seconds, and what it publishes then reaches the other nodes", async () => {
  await demotedMaster(async ({ viaName, promoted, demote }) => {
    const off = { CHANNELS_RECOVERY_WINDOW: "0" };
    const stayed = await readyNode({ env: { ...viaName, ...off } });
    // A node started after the demotion is on the new master.
    let fresh;
    try {
      demote();
      fresh = await readyNode(promoted, off);
      const noa = await frontend(fresh, fresh, "noa", "admin", ["websocket"]);
      const metrics = async () => (await fetch(`${stayed.url}/metrics`)).text();
      await waitFor(async () => /\nchannels_bus_reconnects_total 1\n/.test(await metrics()), 10_000, "the node on the demoted master reconnected");
      await waitFor(async () => (await fetch(`${stayed.url}/readyz`)).status === 200, 10_000, "ready again");
      await post(stayed, { msg: "after", channel: "admin" });
      await exactly(noa, ["after"]);
      noa.close();
    } finally {
      await fresh?.stop();
      await stayed.stop();
    }
  });
});

// A coordinated failover (a managed Redis's maintenance) demotes a master
// that stays up, and a slot migration (resharding) moves a slot to another
// master: either way the master that stops serving the slot ends its
// sharded subscriptions with a push, and the publishes go elsewhere.
// Before the bus treated that push as a loss, every socket of those topics
// missed all that followed, each publish answered 200.
const moves = [
  ["coordinated failover", { replicas: 1 }, async (redis, topic) => {
    const replica = redis.replicaOf(redis.master(topic));
    assert.match(redis.cli(replica, "CLUSTER", "FAILOVER"), /OK/);
    await waitFor(() => redis.master(topic) === replica, 10_000, "the replica promoted");
  }],
  ["slot migration", {}, async (redis, topic) => {
    const to = redis.migrate(topic);
    assert.equal(redis.master(topic), to);
  }],
];
for (const [move, cluster, moveSlot] of moves) for (const [mode, env, topic] of [
  ["recovery on", {}, "{channels}:c:admin"],
  ["recovery off", { CHANNELS_RECOVERY_WINDOW: "0" }, "channels:c:admin"],
]) test(`a Redis Cluster's ${move}, ${mode}: a socket that stayed receives everything answered 200 after it`, async () => {
  const redis = await startRedisCluster(cluster);
  const node = await readyNode(redis, env);
  try {
    const noa = await frontend(node, node, "noa", "admin", ["websocket"]);
    await post(node, { msg: "before", channel: "admin" });
    await exactly(noa, ["before"]);
    await moveSlot(redis, topic);
    const sent = [];
    for (let i = 1; i <= 5; i++) {
      await postThrough(node, { msg: `after ${i}`, channel: "admin" }, `${move}-${mode}-${i}`.replaceAll(" ", "-"));
      sent.push(`after ${i}`);
    }
    await exactly(noa, ["before", ...sent]);
    noa.close();
  } finally {
    await node.stop();
    await redis.stop();
  }
});
