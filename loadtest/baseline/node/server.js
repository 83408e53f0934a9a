// The Node baseline of the channels benchmarks: the same contract as the
// gateway (docs/protocol.md) on socket.io 4.8, written to be fast rather than
// complete: a raw http server, HS256 ws-token checks with node:crypto, and
// one room per target (channel, user, user+channel) so each /notify is a
// single `io.to(room).emit`. With REDIS_URL it runs as a cluster node through
// the official @socket.io/redis-adapter. With RECOVERY=1, socket.io's
// connectionStateRecovery is on (a 120 s window, as channels' default), and
// a cluster node uses @socket.io/redis-streams-adapter, the adapter that
// supports it. POST /notify/batch is channels' batch endpoint as a loop of
// room emits.
//
// Environment: PORT, WS_SECRET, API_KEY, REDIS_URL (optional), RECOVERY
// (optional).
"use strict";

const http = require("node:http");
const crypto = require("node:crypto");
const { Server } = require("socket.io");

const PORT = Number(process.env.PORT || 3100);
const WS_SECRET = process.env.WS_SECRET;
const API_KEY = process.env.API_KEY;
const MAX_BODY = 1024 * 1024;
if (!WS_SECRET || !API_KEY) throw new Error("WS_SECRET and API_KEY are required");

const apiKey = Buffer.from(API_KEY);
const wsKey = Buffer.from(WS_SECRET);
const CHANNEL = /^[A-Za-z0-9_.:-]{1,64}$/;

/** The subject of a valid ws token (HS256, aud channels-ws, not expired), or null. */
function verifyWsToken(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  const expected = crypto.createHmac("sha256", wsKey).update(`${parts[0]}.${parts[1]}`).digest();
  const given = Buffer.from(parts[2], "base64url");
  if (given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) return null;
  try {
    const header = JSON.parse(Buffer.from(parts[0], "base64url"));
    const claims = JSON.parse(Buffer.from(parts[1], "base64url"));
    if (header.alg !== "HS256" || claims.aud !== "channels-ws" || claims.iss !== "channels") return null;
    if (typeof claims.exp !== "number" || claims.exp * 1000 < Date.now() - 5000) return null;
    return typeof claims.sub === "string" ? claims.sub : null;
  } catch {
    return null;
  }
}

function keyOk(key) {
  if (typeof key !== "string") return false;
  const given = Buffer.from(key);
  return given.length === apiKey.length && crypto.timingSafeEqual(given, apiKey);
}

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

const fail = (res, status, error, message) => send(res, status, { error, message });
const target = (v) => typeof v === "string" && v.length > 0;

/** The room and variant of a notification, or an error message. */
function route(item) {
  if (item === null || typeof item !== "object" || Array.isArray(item)) return { error: "must be a JSON object" };
  const { msg, keycloak, channel } = item;
  if (msg === undefined || msg === null) return { error: "msg is required" };
  if ((keycloak !== undefined && !target(keycloak)) || (channel !== undefined && !CHANNEL.test(channel))) {
    return { error: "invalid target" };
  }
  if (keycloak !== undefined && channel !== undefined) return { room: `uc:${keycloak}:${channel}`, variant: "user_channel" };
  if (keycloak !== undefined) return { room: `u:${keycloak}`, variant: "user" };
  if (channel !== undefined) return { room: `c:${channel}`, variant: "channel" };
  return { error: "at least one of keycloak and channel is required" };
}

const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/healthz") return send(res, 200, { status: "ok" });
  const batch = req.url === "/notify/batch";
  if (req.method !== "POST" || (req.url !== "/notify" && !batch)) return fail(res, 404, "not_found", "no such endpoint");
  if (!(req.headers["content-type"] || "").startsWith("application/json")) {
    return fail(res, 415, "unsupported_media_type", "Content-Type must be application/json");
  }
  const chunks = [];
  let size = 0;
  const limit = batch ? 8 * MAX_BODY : MAX_BODY;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > limit) {
      fail(res, 413, "payload_too_large", "body too large");
      req.destroy();
    } else chunks.push(chunk);
  });
  req.on("end", () => {
    if (size > limit) return;
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks));
    } catch {
      return fail(res, 400, "bad_request", "body is not valid JSON");
    }
    if (body === null || typeof body !== "object" || Array.isArray(body)) {
      return fail(res, 400, "bad_request", "body must be a JSON object");
    }
    if (!keyOk(req.headers["x-api-key"] ?? body.API_KEY)) return fail(res, 401, "unauthorized", "unknown API key");
    if (!batch) {
      const { room, variant, error } = route(body);
      if (error) return fail(res, 400, "bad_request", error);
      io.to(room).emit("notification", body.msg);
      return send(res, 200, { id: crypto.randomUUID(), variant });
    }
    // The batch endpoint of channels, as a loop of room emits: validated
    // whole, then emitted in order.
    const items = body.notifications;
    if (!Array.isArray(items) || items.length < 1 || items.length > 1000) {
      return fail(res, 400, "bad_request", "notifications must hold 1 to 1000 items");
    }
    const routes = items.map(route);
    const bad = routes.findIndex((r) => r.error);
    if (bad >= 0) return send(res, 400, { error: "bad_request", message: routes[bad].error, index: bad });
    const results = routes.map(({ room, variant }, i) => {
      io.to(room).emit("notification", items[i].msg);
      return { id: crypto.randomUUID(), variant };
    });
    send(res, 200, { results });
  });
});

const RECOVERY = process.env.RECOVERY === "1";
const io = new Server(server, {
  serveClient: false,
  cors: { origin: "*" },
  ...(RECOVERY ? { connectionStateRecovery: { maxDisconnectionDuration: 120_000, skipMiddlewares: true } } : {}),
});

io.use((socket, next) => {
  const { token, keycloakID, channel } = socket.handshake.auth || {};
  if (!target(keycloakID) || !CHANNEL.test(channel ?? "")) return next(new Error("bad_request"));
  if (verifyWsToken(token) !== keycloakID) return next(new Error("unauthorized"));
  socket.join([`c:${channel}`, `u:${keycloakID}`, `uc:${keycloakID}:${channel}`]);
  next();
});

async function main() {
  if (process.env.REDIS_URL) {
    const { createClient } = require("redis");
    const pub = createClient({ url: process.env.REDIS_URL });
    if (RECOVERY) {
      const { createAdapter } = require("@socket.io/redis-streams-adapter");
      await pub.connect();
      io.adapter(createAdapter(pub));
    } else {
      const { createAdapter } = require("@socket.io/redis-adapter");
      const sub = pub.duplicate();
      await Promise.all([pub.connect(), sub.connect()]);
      io.adapter(createAdapter(pub, sub));
    }
  }
  server.listen(PORT, "127.0.0.1", () => console.log(`node baseline listening on ${PORT}`));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
