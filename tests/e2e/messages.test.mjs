// A message of every JSON type arrives exactly as posted.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { notify, startNode, userSocket } from "./helpers.mjs";

let node;
before(async () => (node = await startNode()));
after(() => node.stop());

const MESSAGES = {
  string: "hello",
  "empty string": "",
  "JSON-looking string": '{"not":"an object"}',
  integer: 42,
  negative: -7,
  float: 3.25,
  zero: 0,
  true: true,
  false: false,
  array: [1, "two", null, false, { three: 3 }],
  "empty array": [],
  "empty object": {},
  "nested object": { a: { b: { c: [1, { d: "deep" }] } }, order: { z: 1, a: 2 } },
  unicode: "héllo wörld ✓ 日本語 🚀 \u0000 \n\t\"quoted\"",
  "100 KB string": "x".repeat(100 * 1024),
};

for (const transports of [["websocket"], ["polling"]]) {
  test(`every JSON type arrives unchanged over ${transports[0]}`, async () => {
    const socket = await userSocket(node, `typer-${transports[0]}`, "admin", transports);
    try {
      for (const [name, msg] of Object.entries(MESSAGES)) {
        const r = await notify(node, { msg, keycloak: `typer-${transports[0]}` });
        assert.equal(r.status, 200, name);
        const got = await socket.nextNotification();
        assert.deepEqual(got, msg, name);
        // Key order of objects is kept, too.
        assert.equal(JSON.stringify(got), JSON.stringify(msg), name);
      }
    } finally {
      socket.close();
    }
  });
}
