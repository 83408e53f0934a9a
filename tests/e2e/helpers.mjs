// Helpers of the end-to-end suite: start the real `channels` binary, mint
// upstream tokens, and open sockets with the official socket.io client.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { createInterface } from "node:readline";
import { io } from "socket.io-client";

export const UPSTREAM_SECRET = "e2e-upstream-secret-0123456789abcdef";
export const WS_SECRET = "e2e-ws-token-secret-0123456789abcdef";
export const API_KEY = "e2e-api-key";

/** Starts a node on an ephemeral loopback port; resolves once it serves. */
export async function startNode(extraEnv = {}) {
  const bin = process.env.CHANNELS_BIN;
  if (!bin) throw new Error("CHANNELS_BIN must point to the channels binary");
  const child = spawn(bin, ["serve"], {
    env: {
      PATH: process.env.PATH,
      CHANNELS_LISTEN: "127.0.0.1:0",
      CHANNELS_AUTH_HS256_SECRET: UPSTREAM_SECRET,
      CHANNELS_WS_TOKEN_SECRET: WS_SECRET,
      CHANNELS_API_KEYS: API_KEY,
      CHANNELS_LOG_FORMAT: "json",
      // E2E_NODE_LOG=debug (say) prints every node's log lines, to debug a test.
      CHANNELS_LOG: process.env.E2E_NODE_LOG ?? "info",
      ...extraEnv,
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const lines = createInterface({ input: child.stderr });
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("node did not start in 10 s")), 10_000);
    child.on("exit", (code) => reject(new Error(`node exited with ${code}`)));
    lines.on("line", (line) => {
      if (process.env.E2E_NODE_LOG) process.stderr.write(`[node ${child.pid}] ${line}\n`);
      try {
        const entry = JSON.parse(line);
        if (entry.fields?.message === "channels node serving") {
          clearTimeout(timer);
          resolve(entry.fields.addr);
        }
      } catch {
        // not a JSON log line
      }
    });
  });
  const url = `http://${addr}`;
  return {
    url,
    child,
    async stop() {
      await stopChild(child, "SIGTERM");
    },
  };
}

const b64url = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");

/** An HS256 upstream access token for `sub`, signed with the e2e secret. */
export function upstreamToken(sub, extraClaims = {}) {
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url({ sub, iat: now, exp: now + 600, ...extraClaims })}`;
  const signature = createHmac("sha256", UPSTREAM_SECRET).update(body).digest("base64url");
  return `${body}.${signature}`;
}

/** The frontend's flow: trade the access token for a ws token at /authorize. */
export async function wsToken(node, user) {
  const response = await fetch(`${node.url}/authorize`, {
    headers: { authorization: `Bearer ${upstreamToken(user)}` },
  });
  if (response.status !== 200) throw new Error(`authorize answered ${response.status}`);
  return (await response.json()).token;
}

/** Opens a socket; resolves once connected, rejects with the connect_error. */
export function connect(node, auth, transports = ["polling", "websocket"]) {
  const socket = io(node.url, { auth, transports, reconnection: false, forceNew: true });
  const received = [];
  const waiters = [];
  socket.on("notification", (msg) => {
    received.push(msg);
    if (waiters.length) waiters.shift()();
  });
  /** Resolves with the next notification, or null after `ms`. */
  socket.nextNotification = (ms = 5000) =>
    new Promise((resolve) => {
      if (received.length) return resolve(received.shift());
      const waiter = () => {
        clearTimeout(timer);
        resolve(received.shift());
      };
      const timer = setTimeout(() => {
        waiters.splice(waiters.indexOf(waiter), 1);
        resolve(null);
      }, ms);
      waiters.push(waiter);
    });
  return new Promise((resolve, reject) => {
    socket.on("connect", () => resolve(socket));
    socket.on("connect_error", (err) => {
      socket.close();
      reject(err);
    });
  });
}

/** A connected socket for `user` in `channel`, with a token from /authorize. */
export async function userSocket(node, user, channel, transports) {
  return connect(node, { token: await wsToken(node, user), keycloakID: user, channel }, transports);
}

/** POST /notify with a JSON body (API key included unless given). */
export async function notify(node, body, headers = {}) {
  const response = await fetch(`${node.url}/notify`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: typeof body === "string" ? body : JSON.stringify({ API_KEY, ...body }),
  });
  return { status: response.status, body: await response.json() };
}

/** Waits until the engine has upgraded to websocket (or fails after 5 s). */
export function upgraded(socket) {
  return new Promise((resolve, reject) => {
    if (socket.io.engine.transport.name === "websocket") return resolve();
    const timer = setTimeout(() => reject(new Error("no upgrade within 5 s")), 5000);
    socket.io.engine.once("upgrade", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** A free TCP port on loopback. */
export async function freePort() {
  const { createServer } = await import("node:net");
  return new Promise((resolve) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Spawns a process, resolves once `ready()` holds; `stop()` kills it. */
async function spawnReady(cmd, args, env, ready, what) {
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: "ignore" });
  const deadline = Date.now() + 10_000;
  while (!(await ready())) {
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}`);
    if (Date.now() > deadline) throw new Error(`${what} did not start in 10 s`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return {
    child,
    async stop() {
      await stopChild(child, "SIGKILL");
    },
  };
}

/**
 * Sends `signal` to `child` and waits for it to exit: at most 10 s, then
 * SIGKILL, and at most 5 s more. Bounded, so a stop never holds a suite:
 * a CI run once waited without end in a Redis Cluster's stop, the first
 * master gone and no `exit` seen.
 */
async function stopChild(child, signal) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once("exit", resolve));
  // The timer is cleared once the child exits: left running, it would keep
  // the test file's process alive for its whole 10 s.
  const within = (ms) => {
    let timer;
    const late = new Promise((resolve) => (timer = setTimeout(() => resolve(false), ms)));
    return Promise.race([exited.then(() => true), late]).finally(() => clearTimeout(timer));
  };
  child.kill(signal);
  if (await within(10_000)) return;
  child.kill("SIGKILL");
  await within(5_000);
}

/**
 * A private redis-server on a free port (or on `port`, to restart one);
 * `cli(...args)` runs a command on it and returns its trimmed output.
 */
export async function startRedis(port) {
  port ??= await freePort();
  const { execFileSync } = await import("node:child_process");
  const pong = () => {
    try {
      return execFileSync("redis-cli", ["-p", String(port), "PING"]).toString().trim() === "PONG";
    } catch {
      return false;
    }
  };
  // Its own directory: a replica (after REPLICAOF) writes the RDB it syncs.
  const { mkdtempSync, rmSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const { join } = await import("node:path");
  const dir = mkdtempSync(join(tmpdir(), "channels-e2e-redis-"));
  const server = await spawnReady(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    {},
    async () => pong(),
    "redis-server",
  );
  const url = `redis://127.0.0.1:${port}`;
  return {
    ...server,
    port,
    url,
    env: { CHANNELS_REDIS_URL: url },
    cli: (...args) => execFileSync("redis-cli", ["-p", String(port), ...args]).toString().trim(),
    async stop() {
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A master, a replica and three Sentinels watching them (quorum 2, the
 * master judged down after 1 s), on free ports; `env` is what a node needs
 * to find the master through the Sentinels, `killMaster()` SIGKILLs it.
 */
export async function startRedisSentinel() {
  const { execFileSync } = await import("node:child_process");
  const { mkdtempSync, writeFileSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const { join } = await import("node:path");
  const cli = (port, ...args) => {
    try {
      return execFileSync("redis-cli", ["-p", String(port), ...args]).toString();
    } catch {
      return "";
    }
  };
  const master = await startRedis();
  const replicaPort = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "channels-sentinel-"));
  // A replica loads its first sync from a file in its `--dir`: here, not the cwd.
  const replica = await spawnReady(
    "redis-server",
    ["--port", String(replicaPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
      "--dir", dir, "--replicaof", "127.0.0.1", String(master.port)],
    {},
    async () => cli(replicaPort, "INFO", "replication").includes("master_link_status:up"),
    "replica",
  );
  const sentinelPorts = [await freePort(), await freePort(), await freePort()];
  const sentinels = [];
  for (const port of sentinelPorts) {
    const config = join(dir, `sentinel-${port}.conf`);
    writeFileSync(
      config,
      [
        `port ${port}`,
        "bind 127.0.0.1",
        `dir ${dir}`,
        `sentinel monitor mymaster 127.0.0.1 ${master.port} 2`,
        "sentinel down-after-milliseconds mymaster 1000",
        "sentinel failover-timeout mymaster 5000",
        "",
      ].join("\n"),
    );
    sentinels.push(
      await spawnReady("redis-server", [config, "--sentinel"], {}, async () => cli(port, "PING").trim() === "PONG", "sentinel"),
    );
  }
  // Ready for a failover once every Sentinel knows the replica and the others.
  const deadline = Date.now() + 20_000;
  for (const port of sentinelPorts) {
    while (
      !(cli(port, "SENTINEL", "replicas", "mymaster").includes(String(replicaPort)) &&
        cli(port, "SENTINEL", "sentinels", "mymaster").split("\n").filter((l) => l === "runid").length === 2)
    ) {
      if (Date.now() > deadline) throw new Error("the Sentinels did not find each other in 20 s");
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
  const hosts = sentinelPorts.map((port) => `127.0.0.1:${port}`).join(",");
  return {
    env: { CHANNELS_REDIS_URL: `redis+sentinel://${hosts}/mymaster` },
    killMaster: () => master.stop(),
    /** The port of the master the Sentinels name now. */
    masterPort: () => Number(cli(sentinelPorts[0], "SENTINEL", "get-master-addr-by-name", "mymaster").split("\n")[1]),
    async stop() {
      for (const sentinel of sentinels) await sentinel.stop();
      await replica.stop();
      await master.stop();
    },
  };
}

/**
 * A Redis Cluster of three masters on free ports, built with
 * `redis-cli --cluster create`; with `replicas`, each master has that many
 * replicas (a failover then promotes one). `env` is what a node needs to
 * use it; `cli`, `master(key)`, `replicaOf(port)` and `signal(port, sig)`
 * let a test find and fail the servers.
 */
export async function startRedisCluster({ replicas = 0 } = {}) {
  const { execFileSync } = await import("node:child_process");
  const { mkdtempSync, rmSync } = await import("node:fs");
  const { tmpdir } = await import("node:os");
  const { join } = await import("node:path");
  const dir = mkdtempSync(join(tmpdir(), "channels-e2e-cluster-"));
  const cli = (port, ...args) => {
    try {
      return execFileSync("redis-cli", ["-p", String(port), ...args]).toString();
    } catch {
      return "";
    }
  };
  const ports = [];
  while (ports.length < 3 * (1 + replicas)) {
    const port = await freePort();
    // The cluster bus listens on port + 10000.
    if (port < 55_000 && !ports.includes(port)) ports.push(port);
  }
  const servers = new Map();
  for (const port of ports) {
    const args = ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"];
    args.push("--cluster-enabled", "yes", "--cluster-node-timeout", "2000");
    args.push("--cluster-config-file", join(dir, `nodes-${port}.conf`), "--dir", dir);
    servers.set(port, await spawnReady("redis-server", args, {}, async () => cli(port, "PING").trim() === "PONG", "redis-server"));
  }
  execFileSync("redis-cli", ["--cluster", "create", ...ports.map((p) => `127.0.0.1:${p}`), "--cluster-replicas", String(replicas), "--cluster-yes"], { stdio: "ignore" });
  /** `CLUSTER NODES` as seen from `port`: id, port, flags, master id, slots. */
  const nodes = (port) =>
    cli(port, "CLUSTER", "NODES").trim().split("\n").filter(Boolean).map((line) => {
      const [id, address, flags, master, , , , , ...slots] = line.split(" ");
      return { id, port: Number(address.split(":")[1].split("@")[0]), flags: flags.split(","), master, slots };
    });
  const synced = (port) => {
    const info = cli(port, "INFO", "replication");
    return info.includes("role:master") || info.includes("master_link_status:up");
  };
  const deadline = Date.now() + 20_000;
  while (!ports.every((port) => cli(port, "CLUSTER", "INFO").includes("cluster_state:ok") && synced(port))) {
    if (Date.now() > deadline) throw new Error("the Redis Cluster did not reach state ok");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const urls = ports.map((port) => `redis://127.0.0.1:${port}`).join(",");
  const alive = () => ports.find((port) => servers.get(port).child.exitCode === null && cli(port, "PING").trim() === "PONG");
  return {
    env: { CHANNELS_REDIS_URL: urls, CHANNELS_REDIS_CLUSTER: "true" },
    cli,
    /**
     * The port of the master that serves `key`'s slot now; undefined while
     * a failover leaves the slot to no master in the view asked.
     */
    master(key) {
      const slot = Number(cli(alive(), "CLUSTER", "KEYSLOT", key));
      const owner = nodes(alive()).find((node) =>
        node.flags.includes("master") && !node.flags.includes("fail") &&
        node.slots.some((range) => {
          const [from, to = from] = range.split("-").map(Number);
          return from <= slot && slot <= to;
        }));
      return owner?.port;
    },
    /** The port of a replica of the master on `port`. */
    replicaOf(port) {
      const all = nodes(alive());
      const master = all.find((node) => node.port === port);
      return all.find((node) => node.master === master.id).port;
    },
    signal(port, signal) {
      servers.get(port).child.kill(signal);
    },
    /**
     * Moves `key`'s slot and its keys to another master, as `redis-cli
     * --cluster reshard` does; returns that master's port.
     */
    migrate(key) {
      const from = this.master(key);
      const masters = nodes(alive()).filter((node) => node.flags.includes("master")).map((node) => node.port);
      const to = masters.find((port) => port !== from);
      const slot = cli(from, "CLUSTER", "KEYSLOT", key).trim();
      const id = (port) => cli(port, "CLUSTER", "MYID").trim();
      cli(to, "CLUSTER", "SETSLOT", slot, "IMPORTING", id(from));
      cli(from, "CLUSTER", "SETSLOT", slot, "MIGRATING", id(to));
      for (let round = 0; round < 100; round++) {
        const keys = cli(from, "CLUSTER", "GETKEYSINSLOT", slot, "100").split("\n").filter(Boolean);
        if (keys.length === 0) break;
        cli(from, "MIGRATE", "127.0.0.1", String(to), "", "0", "5000", "KEYS", ...keys);
      }
      for (const port of [to, from, ...masters.filter((port) => port !== to && port !== from)]) {
        cli(port, "CLUSTER", "SETSLOT", slot, "NODE", id(to));
      }
      return to;
    },
    async stop() {
      for (const server of servers.values()) {
        server.child.kill("SIGCONT");
        await server.stop();
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** HAProxy with deploy/haproxy/haproxy.cfg in front of `nodes`. */
export async function startHaproxy(nodes) {
  const port = await freePort();
  const config = new URL("../../deploy/haproxy/haproxy.cfg", import.meta.url).pathname;
  const env = { CHANNELS_LB_BIND: `127.0.0.1:${port}` };
  nodes.forEach((node, i) => (env[`CHANNELS_NODE${i + 1}`] = node.url.replace("http://", "")));
  const url = `http://127.0.0.1:${port}`;
  const lb = await spawnReady(
    "haproxy",
    ["-f", config, "-db"],
    env,
    async () => {
      try {
        return (await fetch(`${url}/readyz`)).status === 200;
      } catch {
        return false;
      }
    },
    "haproxy",
  );
  return { ...lb, url };
}

/**
 * A TCP proxy on loopback that plays the load balancer: `cut()` drops every
 * connection, `pause()` refuses new ones until `resume()`, `to(node)` sends
 * new connections to another node, and `blackhole()` makes every open
 * connection silently carry nothing more either way, with no FIN or RST
 * (a phone that changed networks, a laptop closed), while new connections
 * pass.
 */
export async function startProxy(node) {
  const net = await import("node:net");
  let target = new URL(node.url);
  let paused = false;
  const open = new Set();
  // The connections still carrying bytes.
  const pairs = new Set();
  const server = net.createServer((client) => {
    if (paused) return client.destroy();
    const upstream = net.connect(Number(target.port), target.hostname);
    const pair = [client, upstream];
    pair.forEach((s) => open.add(s));
    pairs.add(pair);
    const close = () => (pair.forEach((s) => (s.destroy(), open.delete(s))), pairs.delete(pair));
    client.pipe(upstream);
    upstream.pipe(client);
    for (const s of pair) {
      s.on("error", close);
      s.on("close", close);
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut: () => [...open].forEach((s) => s.destroy()),
    pause: () => (paused = true),
    resume: () => (paused = false),
    to: (next) => (target = new URL(next.url)),
    blackhole: () => {
      for (const [client, upstream] of pairs) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        // Read and drop: what the node writes is acknowledged and lost.
        client.on("data", () => {});
        upstream.on("data", () => {});
      }
      pairs.clear();
    },
    close: () => new Promise((resolve) => (server.close(resolve), [...open].forEach((s) => s.destroy()))),
  };
}
