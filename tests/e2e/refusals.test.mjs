// Every refusal of docs/protocol.md, as the official client and a backend see it.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { API_KEY, connect, notify, startNode, upstreamToken, userSocket, wsToken } from "./helpers.mjs";

let node;
before(async () => (node = await startNode({ CHANNELS_MAX_BODY_BYTES: "300000" })));
after(() => node.stop());

async function refusal(auth, transports) {
  try {
    const socket = await connect(node, auth, transports);
    socket.close();
    return "accepted";
  } catch (err) {
    return err.message;
  }
}

describe("socket.io connect_error", () => {
  for (const transports of [["polling", "websocket"], ["websocket"]]) {
    test(`over ${transports.join(" then ")}`, async () => {
      const token = await wsToken(node, "alice");
      const cases = [
        [{ token: "garbage", keycloakID: "alice", channel: "admin" }, "unauthorized"],
        [{ keycloakID: "alice", channel: "admin" }, "unauthorized"],
        [{ token: await wsToken(node, "bob"), keycloakID: "alice", channel: "admin" }, "unauthorized"],
        [{ token: upstreamToken("alice"), keycloakID: "alice", channel: "admin" }, "unauthorized"],
        [{ token, channel: "admin" }, "bad_request"],
        [{ token, keycloakID: "alice" }, "bad_request"],
        [{ token, keycloakID: "alice", channel: "" }, "bad_request"],
        [{ token, keycloakID: "alice", channel: "no spaces" }, "bad_request"],
        [{ token, keycloakID: "alice", channel: "c".repeat(65) }, "bad_request"],
        [{ token, keycloakID: "a".repeat(257), channel: "admin" }, "bad_request"],
        [{ token, keycloakID: 7, channel: "admin" }, "bad_request"],
        [undefined, "bad_request"],
      ];
      for (const [auth, expected] of cases) {
        assert.equal(await refusal(auth, transports), expected, JSON.stringify(auth));
      }
      assert.equal(await refusal({ token, keycloakID: "alice", channel: "admin" }, transports), "accepted");
    });
  }
});

describe("GET /authorize", () => {
  test("refuses a missing, bad or expired token with 401 and WWW-Authenticate", async () => {
    const expired = upstreamToken("alice", { exp: Math.floor(Date.now() / 1000) - 120 });
    for (const header of [undefined, "Bearer garbage", `Bearer ${expired}`, `Basic ${upstreamToken("alice")}`]) {
      const response = await fetch(`${node.url}/authorize`, { headers: header ? { authorization: header } : {} });
      assert.equal(response.status, 401, header);
      assert.equal(response.headers.get("www-authenticate"), "Bearer");
      assert.equal((await response.json()).error, "unauthorized");
    }
  });

  test("answers token, keycloakID and expiresIn", async () => {
    const response = await fetch(`${node.url}/authorize`, {
      headers: { authorization: `Bearer ${upstreamToken("alice")}` },
    });
    assert.equal(response.status, 200);
    const body = await response.json();
    assert.equal(body.keycloakID, "alice");
    assert.equal(body.expiresIn, 300);
    assert.equal(typeof body.token, "string");
  });
});

describe("POST /notify errors deliver nothing", () => {
  test("every error status and code", async () => {
    const socket = await userSocket(node, "alice", "admin", ["websocket"]);
    const post = (body, contentType = "application/json") =>
      fetch(`${node.url}/notify`, { method: "POST", headers: { "content-type": contentType }, body });
    const cases = [
      [post("{broken"), 400, "bad_request"],
      [post("[1,2]"), 400, "bad_request"],
      [post(JSON.stringify({ API_KEY, channel: "admin" })), 400, "bad_request"],
      [post(JSON.stringify({ API_KEY, msg: null, channel: "admin" })), 400, "bad_request"],
      [post(JSON.stringify({ API_KEY, msg: 1 })), 400, "bad_request"],
      [post(JSON.stringify({ API_KEY, msg: 1, channel: 5 })), 400, "bad_request"],
      [post(JSON.stringify({ API_KEY, msg: 1, keycloak: "" })), 400, "bad_request"],
      [post(JSON.stringify({ API_KEY, msg: 1, channel: "x".repeat(65) })), 400, "bad_request"],
      [post(JSON.stringify({ msg: 1, channel: "admin" })), 401, "unauthorized"],
      [post(JSON.stringify({ API_KEY: "wrong", msg: 1, channel: "admin" })), 401, "unauthorized"],
      [post(JSON.stringify({ API_KEY, msg: 1, channel: "admin" }), "text/plain"), 415, "unsupported_media_type"],
      [post(JSON.stringify({ API_KEY, msg: "x".repeat(300_001), channel: "admin" })), 413, "payload_too_large"],
    ];
    for (const [pending, status, code] of cases) {
      const response = await pending;
      assert.equal(response.status, status, code);
      const body = await response.json();
      assert.equal(body.error, code);
      assert.equal(typeof body.message, "string");
    }
    assert.equal(await socket.nextNotification(500), null, "a refused call delivered something");
    const ok = await notify(node, { msg: "after", channel: "admin" });
    assert.equal(ok.status, 200);
    assert.equal(await socket.nextNotification(), "after");
    socket.close();
  });

  test("the X-API-Key header works instead of API_KEY", async () => {
    const r = await notify(node, JSON.stringify({ msg: 1, channel: "admin" }), { "x-api-key": API_KEY });
    assert.equal(r.status, 200);
  });
});
